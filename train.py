"""Fine-tune a pretrained torchvision classifier on an ImageFolder.

    accelerate launch train.py --data DATA --model resnet18 --weights DEFAULT --epochs 5
    accelerate launch train.py            # the offline demo: MobileNetV2 on LFW faces vs not faces

The same script runs under python, accelerate launch and torchrun, on CPU or GPU.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from accelerate.utils import set_seed

from finetune.checkpoint import describe_checkpoint, save_checkpoint
from finetune.config import TrainConfig, parse_config
from finetune.data import ModelInput, load_splits, make_eval_loader, make_train_loader
from finetune.demo import demo_dataset
from finetune.features import cached_loaders, probe_module
from finetune.engine import NonFiniteLossError, evaluate, train_one_epoch
from finetune.errors import Stopped, UserError, run_cli
from finetune.models import build_classifier, recorded_arch_kwargs
from finetune.preemption import StopSignal
from finetune.optim import build_optimizer, build_scheduler, param_groups
from finetune.preflight import apply_policy, check_dataset
from finetune.reporting import Reporter, preflight_table
from finetune.rundir import prepare_run_dir
from finetune.runtime import build_accelerator, default_num_workers, rss_mib
from finetune.state import latest_state, load_training_state, save_training_state


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    config: TrainConfig = parse_config(argv, TrainConfig, description=__doc__.splitlines()[0])
    accelerator = build_accelerator(config.mixed_precision, config.grad_accum_steps, config.compile)
    report = Reporter(enabled=accelerator.is_main_process)
    set_seed(config.seed)

    with accelerator.main_process_first():
        data_dir = Path(config.data) if config.data else demo_dataset()
        load_splits(data_dir)  # the layout is sound: train/, test/, class folders
    if config.check_data:
        return check_data(data_dir, report)
    exclude, notes = apply_policy(check_dataset(data_dir, full=False), config.bad_data)
    splits = load_splits(data_dir, frozenset(exclude))
    for note in notes + splits.warnings:
        report.print(f"warning: {note}")
    run_dir = prepare_run_dir(config, data_dir, accelerator.is_main_process)

    clf = build_classifier(config.model, config.weights, splits.classes, image_size=config.image_size,
                           freeze_spec=config.freeze, reuse_classifier=config.reuse_classifier)
    if config.channels_last:
        clf.net = clf.net.to(memory_format=torch.channels_last)
    head_mult = config.lr_head_mult if clf.weights.pretrained else 1.0  # from scratch: one learning rate
    groups = param_groups(clf.net, clf.head, config.lr, head_mult, config.weight_decay, config.decay_norm_and_bias)
    optimizer = build_optimizer(config.optimizer, groups, config.lr, config.momentum)
    workers = config.num_workers if config.num_workers >= 0 else default_num_workers(accelerator.num_processes)
    to_input = ModelInput(clf.preprocessing.mean, clf.preprocessing.std, config.channels_last)
    trainable, probe = clf.net, None
    if config.freeze == "backbone" and config.augment == "none" and config.cache_features:
        probe = probe_module(clf.net, clf.head, to_input(torch.zeros(1, 3, config.image_size, config.image_size,
                                                                     dtype=torch.uint8)))
    if probe is not None:  # the backbone's output never changes: compute it once, train the head alone
        train_loader, test_loader = cached_loaders(
            accelerator, clf.net, clf.head, splits.train, splits.test, clf.preprocessing, to_input,
            batch_size=config.batch_size, seed=config.seed, num_workers=workers)
        trainable, to_input = probe, (lambda features: features)
        report.print(f"linear probe on cached features ({train_loader.dataset.features.shape[1]} per image)")
    else:
        train_loader = make_train_loader(splits.train, clf.preprocessing, batch_size=config.batch_size,
                                         seed=config.seed, num_workers=workers, augment=config.augment == "classic")
        test_loader = make_eval_loader(splits.test, clf.preprocessing, batch_size=config.batch_size,
                                       num_workers=workers)
    epoch_sampler = train_loader.sampler
    model, optimizer, train_loader, test_loader = accelerator.prepare(trainable, optimizer, train_loader, test_loader)
    steps_per_epoch = len(train_loader)  # batches per process, after Accelerate sharded them
    optimizer_steps = math.ceil(steps_per_epoch / config.grad_accum_steps)
    scheduler = accelerator.prepare(build_scheduler(optimizer, round(config.warmup_epochs * optimizer_steps),
                                                    config.epochs * optimizer_steps))

    report.print(f"{config.model} from {clf.weights.name}: {len(splits.classes)} classes, "
                 f"{len(splits.train)} train / {len(splits.test)} test images from {data_dir}; "
                 f"{accelerator.num_processes} process(es) on {accelerator.device.type}, "
                 f"precision {accelerator.mixed_precision}")
    if clf.reused:
        report.print("reused pretrained classifier rows: "
                     + ", ".join(f"{t} <- {s}" for t, s in clf.reused.items()))
    if clf.frozen:
        report.print("frozen: " + ("the whole backbone" if config.freeze == "backbone" else ", ".join(clf.frozen)))

    progress = {"epoch": 0, "step": 0, "history": [], "best_accuracy": -1.0}
    if config.resume:
        state = latest_state(run_dir)
        if state is None:
            report.print(f"no saved state in {run_dir}: starting from the beginning")
        else:
            progress = load_training_state(accelerator, state)
            report.print(f"resumed from {state} at epoch {progress['epoch'] + 1}, step {progress['step']}")

    def checkpoint_meta(metrics: dict[str, Any]) -> dict[str, Any]:
        return describe_checkpoint(config, clf, splits.classes, metrics,
                                   recorded_arch_kwargs(clf.net))

    def save_state(epoch: int, step: int) -> None:
        save_training_state(accelerator, run_dir, {**progress, "epoch": epoch, "step": step})

    stop = StopSignal()

    def after_step(epoch: int, step: int, check_finite: Callable[[], None]) -> None:
        global_batch = epoch * steps_per_epoch + step + 1
        at_boundary = global_batch % config.grad_accum_steps == 0 and step + 1 < steps_per_epoch
        if at_boundary and stop.agreed(accelerator):
            check_finite()
            save_state(epoch, step + 1)
            raise Stopped(f"stopped by {stop.received or 'a signal to another process'} at epoch "
                                f"{epoch + 1}, step {step + 1}; state saved in {run_dir / 'state'}; "
                                "continue with the same command and --resume")
        if at_boundary and config.save_every and global_batch % (config.save_every * config.grad_accum_steps) == 0:
            check_finite()
            save_state(epoch, step + 1)

    for epoch in range(progress["epoch"], config.epochs):
        start_step = progress["step"] if epoch == progress["epoch"] else 0
        loader = accelerator.skip_first_batches(train_loader, start_step) if start_step else train_loader
        # Through Accelerate's loader (it would reset our sampler to its own iteration count) and
        # directly (its skip wrapper does not pass the epoch on).
        loader.set_epoch(epoch)
        epoch_sampler.set_epoch(epoch)
        report.start_epoch(epoch, config.epochs, steps_per_epoch, start_step)
        try:
            stats = train_one_epoch(
                accelerator, model, loader, optimizer, scheduler, torch.nn.CrossEntropyLoss(
                    label_smoothing=config.label_smoothing), seed=config.seed, epoch=epoch, start_step=start_step,
                to_input=to_input,
                on_step=lambda s, loss, acc, ips: report.update(s, loss, acc, ips),
                after_step=lambda s, check: after_step(epoch, s, check))
        except NonFiniteLossError as err:
            last = [str(p) for p in (run_dir / "model.safetensors", latest_state(run_dir)) if p and p.exists()]
            raise UserError(f"{err}; last good checkpoint: {' and '.join(last) or 'none yet'}; "
                            "try a lower --lr") from None
        preds = evaluate(accelerator, model, test_loader, len(splits.classes), to_input=to_input)
        row = {"epoch": epoch + 1, "train_loss": stats.loss, "train_acc": stats.accuracy,
               "test_acc": preds.accuracy, "lr": scheduler.get_last_lr()[0], "img/s": stats.images_per_s,
               "seconds": stats.seconds, "rss_mib": rss_mib()}
        report.end_epoch(row)
        progress["history"].append(row)
        metrics = {"epoch": epoch + 1, "test_accuracy": preds.accuracy, "train_loss": stats.loss,
                   "num_test_samples": len(preds.targets)}
        if accelerator.is_main_process:
            state_dict = clf.net.state_dict()  # the whole model, also when only its head was prepared
            save_checkpoint(run_dir / "model.safetensors", state_dict, checkpoint_meta(metrics))
            if preds.accuracy > progress["best_accuracy"]:
                save_checkpoint(run_dir / "best.safetensors", state_dict, checkpoint_meta(metrics))
        progress["best_accuracy"] = max(progress["best_accuracy"], preds.accuracy)
        save_state(epoch + 1, 0)

    stop.restore()
    accelerator.wait_for_everyone()
    final = progress["history"][-1] if progress["history"] else {}
    report.print(f"saved {run_dir / 'model.safetensors'} (test accuracy "
                 f"{final.get('test_acc', float('nan')):.4f}); evaluate it with:\n"
                 f"  python eval.py --ckpt {run_dir / 'model.safetensors'} --data {splits.test.root}")
    accelerator.end_training()
    return {"run_dir": run_dir, "history": progress["history"], "classes": splits.classes,
            "model": clf.net}


def check_data(data_dir: Path, report: Reporter) -> dict[str, Any]:
    """``--check-data``: decode every image, look for duplicates, print the report; fail on problems."""
    found = check_dataset(data_dir, full=True)
    report.print(preflight_table(found.counts))
    for path, why in found.bad:
        report.print(f"bad image: {path}: {why}")
    for path, fmt in found.wrong_extension:
        report.print(f"wrong extension: {path} holds {fmt}")
    for train_path, test_path in found.duplicates:
        report.print(f"duplicate: {test_path} is {train_path}")
    for note in found.warnings:
        report.print(f"warning: {note}")
    problems = found.errors + ([f"{len(found.bad)} image(s) cannot be used"] if found.bad else [])
    if problems:
        raise UserError(f"{data_dir}: {'; '.join(problems)}")
    report.print(f"{data_dir}: no problems that stop a run")
    return {"report": found}


if __name__ == "__main__":
    sys.exit(run_cli(main))
