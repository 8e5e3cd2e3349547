"""eval.py --ckpt FILE without --data: the checkpoint records its test folder (absolute path and a
fingerprint of its file listing); a folder gone or changed is one line asking for --data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import FAST, python_cmd, run_cmd, write_checkpoint, write_image_folder

from finetune.commands import eval as eval_cmd
from finetune.commands import train
from finetune.data.evalsplit import describe_split, recorded_split, split_fingerprint
from finetune.data.folders import image_folder
from finetune.errors import UserError
from finetune.models.checkpoint import read_metadata

CLASSES = ["cat", "dog", "hot dog"]
EVAL = ["--num-workers", "0", "--no-plots", "--log-with", "none", "--mixed-precision", "no"]


def test_fingerprint_names_the_files_wherever_the_folder_is(tmp_path: Path):
    a = write_image_folder(tmp_path / "a", {"x": 2, "y": 2})
    shutil.copytree(a, tmp_path / "b")
    files = lambda root: [p for p, _ in image_folder(root).samples]  # noqa: E731
    assert split_fingerprint(files(a), a) == split_fingerprint(files(tmp_path / "b"), tmp_path / "b")
    (tmp_path / "b" / "y" / "001.png").rename(tmp_path / "b" / "x" / "009.png")  # a file moves class
    assert split_fingerprint(files(a), a) != split_fingerprint(files(tmp_path / "b"), tmp_path / "b")


def test_recorded_split_refuses_a_folder_gone_or_changed(tmp_path: Path):
    test = write_image_folder(tmp_path / "test", {"cat": 2, "dog": 2, "hot dog": 2})
    meta = {"splits": {"test": describe_split(image_folder(test, CLASSES), "test")}}
    assert meta["splits"]["test"]["root"] == str(test.resolve()) and meta["splits"]["test"]["num_files"] == 6
    assert len(recorded_split(meta, CLASSES, "m.safetensors").samples) == 6
    (test / "dog" / "000.png").unlink()
    with pytest.raises(UserError, match=r"files in .*test changed since training \(6 images then, 5 now.*--data"):
        recorded_split(meta, CLASSES, "m.safetensors")
    shutil.rmtree(test)
    with pytest.raises(UserError, match="is gone; pass --data DIR"):
        recorded_split(meta, CLASSES, "m.safetensors")
    with pytest.raises(UserError, match="does not record the folder it was tested on"):
        recorded_split({}, CLASSES, "m.safetensors")


def test_eval_without_data_on_a_checkpoint_that_records_nothing(tmp_path: Path):
    ckpt = write_checkpoint(tmp_path / "model.safetensors", CLASSES)
    proc = run_cmd(python_cmd("eval.py", "--ckpt", str(ckpt), *EVAL))
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "pass --data DIR" in proc.stderr


@pytest.mark.slow
def test_eval_without_data_uses_the_recorded_test_folder(tiny_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    train.main(["--data", str(tiny_data), "--output-dir", str(run), *FAST])
    record = read_metadata(run / "model.safetensors")["splits"]["test"]
    assert record["root"] == str((tiny_data / "test").resolve()) and record["num_files"] == 15
    proc = run_cmd(python_cmd("eval.py", "--ckpt", str(run / "model.safetensors"), *EVAL))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"evaluating on {(tiny_data / 'test').resolve()}, the test folder recorded in the checkpoint" in proc.stdout
    assert json.loads((run / "eval" / "metrics.json").read_text())["num_samples"] == 15
    write_image_folder(tiny_data / "test", {"cat": 6})  # one more cat
    with pytest.raises(UserError, match=r"changed since training \(15 images then, 16 now"):
        eval_cmd.main(["--ckpt", str(run / "model.safetensors"), *EVAL])
