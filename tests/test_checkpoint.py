import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from finetune.errors import UserError
from finetune.models.checkpoint import load_checkpoint, save_checkpoint, separate_tensors
from finetune.utils.files import atomic_path, atomic_write_text

META = {"arch": "resnet18", "classes": ["a", "b"], "image_size": 32, "resize_size": 37,
        "mean": [0.5] * 3, "std": [0.25] * 3}


def test_round_trip_keeps_tensors_and_metadata(tmp_path: Path):
    weight = torch.randn(3, 4)
    tied = {"a.weight": weight, "b.weight": weight}  # shared memory, as tied weights are
    save_checkpoint(tmp_path / "m.safetensors", tied, META)
    tensors, meta = load_checkpoint(tmp_path / "m.safetensors")
    assert torch.equal(tensors["a.weight"], weight) and torch.equal(tensors["b.weight"], weight)
    assert meta == META


def test_atomic_write_leaves_old_file_when_writing_fails(tmp_path: Path):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "good")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


@pytest.mark.parametrize("kind, message", [
    ("missing", "checkpoint not found"),
    ("random", "not a readable safetensors checkpoint"),
    ("pickle", "not a readable safetensors checkpoint"),
    ("truncated", "not a readable safetensors checkpoint"),
    ("no-meta", "without finetune metadata"),
    ("bad-meta", "lacks arch"),
])
def test_bad_checkpoints_are_one_clear_error(tmp_path: Path, kind: str, message: str):
    path = tmp_path / "model.safetensors"
    if kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"weight": [1, 2, 3]}))
    elif kind == "truncated":
        save_checkpoint(path, {"w": torch.randn(100, 100)}, META)
        path.write_bytes(path.read_bytes()[:5000])
    elif kind == "no-meta":
        save_file({"w": torch.zeros(2)}, str(path))
    elif kind == "bad-meta":
        save_file({"w": torch.zeros(2)}, str(path), metadata={"finetune": json.dumps({"classes": ["a"]})})
    with pytest.raises(UserError, match=message) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_separate_tensors_copies_only_shared_memory():
    weight, other = torch.randn(3, 4), torch.randn(2)
    nhwc = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)
    out = separate_tensors({"a": weight, "b": weight, "c": other, "d": nhwc, "e": weight[1]})
    ptrs = [t.untyped_storage().data_ptr() for t in out.values()]
    assert len(set(ptrs)) == len(ptrs)  # what safetensors requires
    assert out["a"].data_ptr() == weight.data_ptr() and out["c"].data_ptr() == other.data_ptr()  # no copy
    assert out["d"].is_contiguous() and torch.equal(out["d"], nhwc)
    assert torch.equal(out["b"], weight) and torch.equal(out["e"], weight[1])
