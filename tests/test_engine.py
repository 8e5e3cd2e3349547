"""The training step loop: a non-finite loss is found late (no per-step host sync) but named exactly."""

from __future__ import annotations

import pytest
import torch
from accelerate.utils import set_seed
from torch import nn

from finetune.training.engine import SYNC_EVERY_STEPS, NonFiniteLossError, Trainer, earliest_bad_step, step_seed
from finetune.training.loop import weights_finite
from finetune.utils.runtime import build_accelerator


@pytest.mark.parametrize("per_process, expected", [
    ([-1], None), ([4], 4), ([-1, -1, -1], None), ([5, 4], 4), ([-1, 7, 9], 7), ([0, -1], 0)])
def test_earliest_bad_step_over_processes(per_process, expected):
    # With DDP, one process's NaN makes every process's weights NaN from the next step on: the
    # first step any process saw is the one to name.
    assert earliest_bad_step(torch.tensor(per_process)) == expected


class NanAt(nn.Module):
    """Cross-entropy, except NaN at one step (counted from 0)."""

    def __init__(self, step: int):
        super().__init__()
        self.step, self.calls = step, 0

    def forward(self, logits, targets):
        loss = nn.functional.cross_entropy(logits, targets)
        self.calls += 1
        return loss * float("nan") if self.calls - 1 == self.step else loss


@pytest.mark.parametrize("bad_step", [0, 3, 12])
def test_the_first_non_finite_step_is_named_whenever_it_is_found(bad_step: int):
    accelerator = build_accelerator("no", cpu_threads=torch.get_num_threads())
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    batches = [(torch.randn(2, 4), torch.tensor([0, 1])) for _ in range(15)]
    trainer = Trainer(accelerator, model, optimizer, scheduler, NanAt(bad_step))
    trainer.start_epoch(1)
    trained = []
    with pytest.raises(NonFiniteLossError, match=rf"at step {bad_step + 1} of epoch 2$"):
        for step, (x, y) in enumerate(batches):
            trainer.train_step(step, x, y)
            trained.append(step)
            if (step + 1) % SYNC_EVERY_STEPS == 0:  # the loop's cadence (loop.after_step)
                trainer.check_finite()
        trainer.end_epoch()
    # Training went on past the bad step until a check found it (every 10 steps, or the end).
    assert max(trained) >= bad_step and max(trained) in (SYNC_EVERY_STEPS - 1, len(batches) - 1)


@pytest.mark.parametrize("seed", [0, 7, 2**32 - 1])
def test_step_seeds_are_valid_torch_seeds_for_every_accepted_seed(seed: int):
    for epoch, step, process in ((0, 0, 0), (10**4, 10**7, 1023), (10**6, 10**9, 65535)):
        value = step_seed(seed, epoch, step, process)
        assert 0 <= value < 2**63
        torch.manual_seed(value)  # would raise "Overflow when unpacking long" beyond 2**64
    set_seed(seed)  # what train.py seeds first (numpy's seeds end at 2**32 - 1: config.py stops --seed there)
    assert step_seed(seed, 0, 1, 0) != step_seed(seed, 0, 2, 0) != step_seed(seed, 1, 1, 0)


def test_precise_batchnorm_holds_the_exact_statistics_of_the_batches_inside_its_window():
    from finetune.training.engine import PreciseBatchNorm

    accelerator = build_accelerator("no")
    torch.manual_seed(0)
    frozen = nn.BatchNorm2d(4)
    for p in frozen.parameters():
        p.requires_grad_(False)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), frozen).train()
    batches = [torch.randn(8, 3, 5, 5) * 3 + 2 for _ in range(5)]
    pretrained_mean = frozen.running_mean.clone()
    window = PreciseBatchNorm(net)
    assert window.layers == [net[1]]  # the frozen one is left alone
    frozen.eval()  # as freezing leaves it
    with torch.no_grad():
        net(batches[0])  # before the window: a running average, forgotten when the window opens
        window.open(fresh=True)
        for images in batches[1:3]:
            net(images)
        window.close(accelerator)
        assert net[1].momentum == 0.1  # restored
        features = torch.cat([net[0](images) for images in batches[1:3]])
        assert torch.allclose(net[1].running_mean, features.mean(dim=(0, 2, 3)), atol=1e-5)
        # A run resumed inside the window goes on with the averages its state holds, to the same result.
        window.open(fresh=True)
        net(batches[3])
        saved = {k: v.clone() for k, v in net[1].state_dict().items()}
        net(batches[4])
        window.close(accelerator)
        straight = net[1].running_var.clone()
        net[1].load_state_dict(saved)
        window.open(fresh=False)
        net(batches[4])
        window.close(accelerator)
    assert torch.equal(net[1].running_var, straight)
    assert torch.equal(frozen.running_mean, pretrained_mean)


def test_batchnorm_statistics_come_from_the_epochs_last_batches():
    from finetune.training.session import batchnorm_window

    assert batchnorm_window(400, 100) == 100  # --recalibrate-bn-batches of them
    assert batchnorm_window(19, 100) == 19  # all of a shorter epoch
    assert batchnorm_window(10, 0) == 0  # off


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_weights_finite_finds_one_bad_weight(bad: float):
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2).to(torch.bfloat16))
    assert weights_finite(net)
    with torch.no_grad():
        net[1].weight[1, 2] = bad
    assert not weights_finite(net)


def test_weights_finite_holds_for_large_half_precision_weights():
    net = nn.Linear(1000, 1000).half()
    with torch.no_grad():
        net.weight.fill_(60000.0)  # finite in fp16, although their fp16 sum would overflow
    assert weights_finite(net)
