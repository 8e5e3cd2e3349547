"""Datasets over ImageFolders, data loaders, and a resumable, seeded sampling order.

Randomness in the data pipeline is a pure function of ``(seed, epoch, sample index)``: the
sampler's order comes from ``(seed, epoch)`` and each sample's augmentation is drawn after
seeding from ``(seed, epoch, index)``. So the images a step sees do not depend on the number
of processes or workers, and a run resumed mid-epoch sees exactly what an uninterrupted one saw.
Decoding lives in ``images``, the transforms in ``presets``, finding splits and class folders
in ``folders``.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info
from torchvision import datasets

from finetune.data.decoding import Encoded, EncodedBatch, stack_channels_last
from finetune.data.images import BadImageError
from finetune.data.presets import Preprocessing, train_preset
from finetune.errors import UserError
from finetune.utils.preemption import end_workers_at_exit, ignore_stop_signals


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    # Large odd multipliers keep nearby (epoch, index) pairs far apart in seed space.
    return (seed * 1_000_003 + epoch * 7_919 * 1_000_033 + index * 2_654_435_761) % (2**63)


def target_tensor(target: int | tuple[int, ...], num_classes: int) -> int | torch.Tensor:
    """A sample's target as the loss takes it: a class index as it is; a multi-label sample's tuple
    of class indices as a multi-hot float vector (an empty tuple: all zeros, a negative of every class)."""
    if not isinstance(target, tuple):
        return target
    hot = torch.zeros(num_classes)
    hot[list(target)] = 1.0
    return hot


def _target(dataset: Any, target: Any) -> Any:
    # Only a multi-label dataset's tuples need its class count (predict.py's listing has no classes).
    return target_tensor(target, len(dataset.classes)) if isinstance(target, tuple) else target


class SkippedImages:
    """Images that failed to decode while a run used them, under ``--bad-data skip``.

    Loader workers are other processes: they send what they skip through a queue, and the run
    names each image once (``new``) and counts them in its summary (``named``).
    """

    def __init__(self) -> None:
        self._owner = os.getpid()
        self._queue = multiprocessing.Queue()
        self._here: list[tuple[str, str]] = []  # skipped in this process (no workers): no queue latency
        self.named: dict[str, str] = {}  # path -> why, in the order they were first met

    def record(self, path: str, why: str) -> None:
        if os.getpid() == self._owner:
            self._here.append((path, why))
        else:
            self._queue.put((path, why))

    def new(self) -> list[tuple[str, str]]:
        """Skipped images not yet returned by an earlier call (call it in the run's own process)."""
        found, self._here = self._here, []
        try:
            while True:
                found.append(self._queue.get(timeout=0.05))
        except queue.Empty:
            pass
        fresh = [(path, why) for path, why in dict(found).items() if path not in self.named]
        self.named.update(fresh)
        return fresh

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_here": []}


class SeededDataset(Dataset):
    """Wraps a dataset whose transform is random: item ``(epoch, i)`` is augmented reproducibly.

    The seed of each sample's augmentation is a function of ``(seed, epoch, i)`` only, so it
    does not matter which worker or process loads it, or whether the run was resumed.

    Args:
        skipped: under ``--bad-data skip``, where images that fail to decode are recorded; the
            next image in the dataset that decodes stands in for one (a function of the index,
            so batches keep their size and a resumed run sees what an uninterrupted one saw).
            None: a decoding failure stops the run, naming the image.
    """

    def __init__(self, dataset: datasets.ImageFolder, transform: Any, seed: int,
                 skipped: SkippedImages | None = None):
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.skipped = skipped

    def __len__(self) -> int:
        return len(self.dataset)

    def _load(self, epoch: int, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.dataset.samples[index]
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only, which the presets draw from: torch.manual_seed also queues
            # seeds for every CUDA device, at 0.25 ms per image (bench/loader_speed.py).
            torch.default_generator.manual_seed(_sample_seed(self.seed, epoch, index))
            return self.transform(path), _target(self.dataset, target)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        for step in range(len(self)):
            stand_in = (index + step) % len(self)
            try:
                return self._load(epoch, stand_in)
            except BadImageError as err:
                if self.skipped is None:
                    raise
                self.skipped.record(self.dataset.samples[stand_in][0], str(err))
        raise UserError(f"no image of {self.dataset.root} can be decoded")


class IndexedDataset(Dataset):
    """A deterministic view of an ImageFolder that also returns each sample's index.

    Args:
        skipped: see ``SeededDataset``; here an image that fails to decode comes back blank
            with index -1, and ``engine.evaluate`` leaves it out.
    """

    def __init__(self, dataset: datasets.ImageFolder, transform: Any, skipped: SkippedImages | None = None):
        self.dataset = dataset
        self.transform = transform
        self.skipped = skipped

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        path, target = self.dataset.samples[index]
        target = _target(self.dataset, target)
        try:
            return self.transform(path), target, index
        except BadImageError as err:
            size = getattr(self.transform, "crop_size", None)  # None: workers hand over bytes, not images
            if self.skipped is None or size is None:
                raise
            self.skipped.record(path, str(err))
            return torch.zeros(3, size, size, dtype=torch.uint8), target, -1


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` keys in an order fixed by ``(seed, epoch)``.

    Accelerate shards the batches of this global order across processes, so processes see
    disjoint parts of one permutation, whatever their number.

    Args:
        global_batch: images per step over all processes; where an epoch would end on a batch
            of one image, that image (the last of the epoch's order, a different one each
            epoch) is left out, since BatchNorm cannot train on one. 0: keep every image.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True, global_batch: int = 0):
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.leaves_out_one = bool(global_batch) and num_samples > 1 and num_samples % global_batch == 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return iter([(epoch, i) for i in self.order(epoch)[:len(self)]])

    def __len__(self) -> int:
        return self.num_samples - self.leaves_out_one


def collate(batch: list[tuple]) -> tuple:
    """A loader batch: images stacked channels-last (in shared memory in a worker, like torch's
    default collate), or an ``EncodedBatch`` when workers hand over bytes; targets (and indices)
    as torch collates them."""
    images = [item[0] for item in batch]
    rest = default_collate([item[1:] for item in batch])
    if isinstance(images[0], Encoded):
        return (EncodedBatch(images), *rest)
    return (stack_channels_last(images, shared=get_worker_info() is not None), *rest)


def make_train_loader(ds: datasets.ImageFolder, pre: Preprocessing, *, batch_size: int, seed: int,
                      num_workers: int, augment: str = "classic", hflip: bool = True, pin_memory: bool = False,
                      decode_in_workers: bool = True, global_batch: int = 0,
                      skipped: SkippedImages | None = None) -> DataLoader:
    """The training DataLoader: augmentation seeded per sample, order fixed per epoch.

    Call ``set_epoch`` on it (or on what Accelerate made of it) before each epoch.

    Args:
        augment, hflip: the augmentation (``presets.train_preset``).
        pin_memory: batches in page-locked memory, for a CUDA device to copy in while it computes
            (with Accelerate's non_blocking, see runtime.build_accelerator); CPUs have nothing to overlap.
        decode_in_workers: False: workers read each file and draw its crop, and hand over the bytes
            (``decoding.EncodedBatch``) for ``presets.ModelInput`` to decode where the model runs.
        global_batch: see ``EpochSampler``: give it when the model trains BatchNorm layers.
        skipped: see ``SeededDataset`` (``--bad-data skip``).
    """
    preset = train_preset(augment, pre, hflip)
    return DataLoader(SeededDataset(ds, preset if decode_in_workers else preset.encode, seed, skipped),
                      batch_size=batch_size, sampler=EpochSampler(len(ds), seed, global_batch=global_batch),
                      collate_fn=collate, **_worker_options(num_workers, pin_memory))


def make_eval_loader(ds: datasets.ImageFolder, pre: Preprocessing, *, batch_size: int,
                     num_workers: int, pin_memory: bool = False, decode_in_workers: bool = True,
                     skipped: SkippedImages | None = None) -> DataLoader:
    """An evaluation DataLoader yielding ``(images, targets, dataset indices)`` in order (``pin_memory``,
    ``decode_in_workers``: see ``make_train_loader``; ``skipped``: see ``IndexedDataset``)."""
    preset = pre.eval_preset()
    return DataLoader(IndexedDataset(ds, preset if decode_in_workers else preset.encode, skipped),
                      batch_size=batch_size, shuffle=False, collate_fn=collate,
                      **_worker_options(num_workers, pin_memory))


def start_workers(loader: DataLoader) -> None:
    """Start the persistent workers of ``loader`` now, before it is first iterated.

    Workers are forked from the training process, and every page of it that the process writes
    afterwards is copied once (copy-on-write): forked after the first epoch, when the weights,
    gradients and optimizer state are there, the held-out loaders' workers made the next training
    step 0.6 s slower on 2 cores (resnet18; a step in isolation: 0.6 s, then 1.9 s). Forked with
    the training loader's, before any of that exists, they cost nothing later. Their first batches
    are decoded now and dropped when the loader is first iterated.
    """
    loader = getattr(loader, "base_dataloader", loader)  # Accelerate's wrapper: the DataLoader it iterates
    if loader.num_workers > 0 and loader.persistent_workers:
        iter(loader)  # a persistent-worker loader keeps this iterator, and its workers, for the next


def _worker_options(num_workers: int, pin_memory: bool) -> dict[str, Any]:
    pin = {"pin_memory": pin_memory}
    if num_workers <= 0:
        return {"num_workers": 0, **pin}
    # Persistent workers keep their start-up cost out of every epoch; 4 batches in flight each
    # hide decode jitter behind compute. Workers leave stop signals to their parent (preemption),
    # which ends them itself at exit.
    end_workers_at_exit()
    return {"num_workers": num_workers, "persistent_workers": True, "prefetch_factor": 4,
            "worker_init_fn": ignore_stop_signals, **pin}
