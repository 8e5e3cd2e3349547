"""Linear probe on cached features: with the backbone frozen and no random augmentation, every
epoch would compute the same backbone outputs again, so they are computed once and the head
trains on them alone."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets

from finetune.data.loader import EpochSampler, make_eval_loader
from finetune.data.presets import Preprocessing


def probe_module(net: nn.Module, head: str, sample: torch.Tensor) -> nn.Module | None:
    """The module that maps cached features to logits, or None where the model cannot be split so.

    The features are the head's input. That works when the head is the model's last operation
    (checked on ``sample``); a Dropout right before the head is kept, so that training on cached
    features regularises as training through the frozen backbone does.
    """
    head_module = net.get_submodule(head)
    features = _head_inputs(net, head, sample)
    with torch.no_grad():
        if not torch.allclose(head_module(features), net.eval()(sample), atol=1e-4, rtol=1e-3):
            return None  # e.g. SqueezeNet: ReLU and pooling follow its output conv
    parent_name, _, name = head.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    if isinstance(parent, nn.Sequential):
        index = list(dict(parent.named_children())).index(name)
        if index > 0 and isinstance(parent[index - 1], nn.Dropout):
            return nn.Sequential(parent[index - 1], head_module)
    return head_module


def _head_inputs(net: nn.Module, head: str, images: torch.Tensor) -> torch.Tensor:
    captured = []
    hook = net.get_submodule(head).register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            net.eval()(images)
    finally:
        hook.remove()
    return captured[0]


class CachedFeatures(Dataset):
    """Features and labels in memory; keyed like ``data.SeededDataset`` (``(epoch, i)``) for training,
    or by index with the index returned, for evaluation."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor, with_index: bool = False):
        self.features = features
        self.targets = targets
        self.with_index = with_index

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, key):
        index = key if self.with_index else key[1]
        item = (self.features[index], self.targets[index])  # a class index, or a multi-hot vector
        return (*item, index) if self.with_index else item


@torch.inference_mode()
def extract_features(accelerator: Accelerator, net: nn.Module, head: str, dataset: datasets.ImageFolder,
                     pre: Preprocessing, to_input: Callable[[torch.Tensor], torch.Tensor], *, batch_size: int,
                     num_workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's input for every image of ``dataset`` (eval preprocessing), on every process.

    Each process computes its shard; the shards are gathered, each image once, in dataset order.
    """
    loader = make_eval_loader(dataset, pre, batch_size=batch_size, num_workers=num_workers,
                              pin_memory=accelerator.device.type == "cuda")
    loader = accelerator.prepare_data_loader(loader)
    net = net.to(accelerator.device).eval()
    parts: dict[str, list[torch.Tensor]] = {"features": [], "targets": [], "indices": []}
    for images, targets, indices in loader:
        with accelerator.autocast():
            feats = _head_inputs(net, head, to_input(images)).float()
        for key, value in zip(parts, accelerator.gather_for_metrics((feats, targets, indices))):
            parts[key].append(value.cpu())
    order = torch.cat(parts["indices"]).argsort()
    return torch.cat(parts["features"])[order], torch.cat(parts["targets"])[order]


def cached_loaders(accelerator: Accelerator, net: nn.Module, head: str, train: datasets.ImageFolder,
                   held_out: Sequence[datasets.ImageFolder], pre: Preprocessing,
                   to_input: Callable[[torch.Tensor], torch.Tensor], *, batch_size: int, seed: int,
                   num_workers: int) -> tuple[DataLoader, list[DataLoader]]:
    """A training loader over cached features, with the same sampling order as images, and one
    evaluation loader per held-out split (test, validation)."""
    options = {"batch_size": batch_size, "num_workers": num_workers}
    train_x, train_y = extract_features(accelerator, net, head, train, pre, to_input, **options)
    evals = []
    for part in held_out:
        x, y = extract_features(accelerator, net, head, part, pre, to_input, **options)
        evals.append(DataLoader(CachedFeatures(x, y, with_index=True), batch_size=batch_size, shuffle=False))
    return DataLoader(CachedFeatures(train_x, train_y), batch_size=batch_size,
                      sampler=EpochSampler(len(train_y), seed)), evals
