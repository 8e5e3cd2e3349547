"""The run folder: no run silently replaces another, and a failed start leaves nothing behind."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path

import pytest
from conftest import FAST

from finetune.commands import train
from finetune.config import TrainConfig
from finetune.errors import UserError
from finetune.models.checkpoint import read_metadata
from finetune.training.rundir import choose_run_dir, default_run_dir


def fake_run(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"a previous run's weights")
    (folder / "config.yaml").write_text("epochs: 9\n")
    return folder


def test_output_dir_holding_a_run_is_refused_unless_overwrite(tiny_data: Path, tmp_path: Path, capsys):
    run = fake_run(tmp_path / "run")
    with pytest.raises(UserError, match=r"holds a previous run: continue it with --resume, replace it with "
                                        r"--overwrite, or choose another --output-dir"):
        train.main(["--data", str(tiny_data), "--output-dir", str(run), *FAST])
    assert "recipe:" not in capsys.readouterr().out  # refused before the recipe is printed
    assert (run / "model.safetensors").read_bytes() == b"a previous run's weights"
    assert (run / "config.yaml").read_text() == "epochs: 9\n"

    # The previous run's pictures and logs go too: TensorBoard would show both runs' curves as one.
    (run / "samples.png").write_bytes(b"a previous run's picture")
    (run / "logs" / "finetune").mkdir(parents=True)
    (run / "logs" / "finetune" / "events.out.tfevents.previous").write_bytes(b"")
    (run / "notes.txt").write_text("the user's own file")
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(["--data", str(tiny_data), "--output-dir", str(run), *FAST, "--overwrite"])
    assert read_metadata(run / "model.safetensors")["classes"] == ["cat", "dog", "hot dog"]
    assert (run / "samples.png").read_bytes()[:4] == b"\x89PNG"
    assert not (run / "logs" / "finetune" / "events.out.tfevents.previous").exists()
    assert (run / "notes.txt").read_text() == "the user's own file"


def test_default_folder_moves_on_to_a_fresh_name(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    data = tmp_path / "data"
    config = TrainConfig(model="resnet18")
    assert choose_run_dir(config, data) == Path("runs/resnet18-data")
    fake_run(tmp_path / "runs" / "resnet18-data")
    assert choose_run_dir(config, data) == Path("runs/resnet18-data-2")
    fake_run(tmp_path / "runs" / "resnet18-data-2")
    (tmp_path / "runs" / "resnet18-data-3").mkdir()  # an empty folder holds no run
    assert choose_run_dir(config, data) == Path("runs/resnet18-data-3")
    # --resume continues the newest run of that name; --overwrite replaces the first.
    assert choose_run_dir(TrainConfig(model="resnet18", resume=True), data) == Path("runs/resnet18-data-2")
    assert choose_run_dir(TrainConfig(model="resnet18", overwrite=True), data) == Path("runs/resnet18-data")


def test_a_run_that_moves_on_to_a_fresh_name_says_so_at_its_start(tiny_data: Path, tmp_path: Path, monkeypatch,
                                                                 capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    fake_run(tmp_path / "runs" / "mobilenet_v3_small-data")
    result = train.main(["--data", str(tiny_data), *FAST, "--log-with", "none", "--no-plots"])
    assert result.run_dir == Path("runs/mobilenet_v3_small-data-2")
    lines = capsys.readouterr().out.splitlines()
    said = next(i for i, line in enumerate(lines) if line.startswith("run folder: "))
    assert lines[said] == ("run folder: runs/mobilenet_v3_small-data-2 (runs/mobilenet_v3_small-data holds an earlier "
                           "run; --output-dir names the folder, --resume continues the newest run)")
    assert said < next(i for i, line in enumerate(lines) if line.startswith("epoch 1"))  # before training


def test_symlinked_data_folder_is_named_after_the_link(tmp_path: Path):
    (tmp_path / "shared-target").mkdir()
    (tmp_path / "flowers").symlink_to(tmp_path / "shared-target")
    config = TrainConfig(model="resnet18")
    assert default_run_dir(config, tmp_path / "flowers").name.startswith("resnet18-flowers")
    assert default_run_dir(config, Path(str(tmp_path / "flowers") + "/")).name.startswith("resnet18-flowers")


def test_resume_and_overwrite_together_are_refused():
    with pytest.raises(UserError, match="choose one"):
        TrainConfig(resume=True, overwrite=True)


@pytest.mark.parametrize("existing", [False, True])
def test_a_run_that_fails_before_its_first_save_leaves_nothing(tiny_data: Path, tmp_path: Path, existing: bool):
    run = tmp_path / "run"
    if existing:  # a folder the user made: it stays, without the failed run's files
        run.mkdir()
        (run / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="weights file not found"):
        train.main(["--data", str(tiny_data), "--output-dir", str(run), *FAST, "--weights", str(tmp_path / "no.pth")])
    if existing:
        assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    else:
        assert not run.exists()


def test_a_run_that_fails_in_its_first_epoch_leaves_no_pictures_or_logs(tiny_data: Path, tmp_path: Path,
                                                                         monkeypatch):
    """samples.png and the tracker's logs exist before the first save: a failed start removes them
    too, so the folder does not look like a run and the same command can run again; what the
    folder held before the run (here a logs/ of the user's own) stays."""
    from finetune.training import run as training_run

    def fail(session, *args, **kwargs):
        session.log.finish()  # samples.png is drawn in the painter process while training starts
        assert (run / "samples.png").exists() and not (run / "curves.png").exists()
        raise UserError("the loss is NaN")

    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "mine.txt").write_text("the user's own log")
    monkeypatch.setattr(training_run, "fit", fail)  # the run calls it by this name
    with pytest.raises(UserError, match="NaN"), contextlib.redirect_stdout(io.StringIO()):
        train.main(["--data", str(tiny_data), "--output-dir", str(run), *FAST, "--log-with", "none"])
    assert sorted(p.name for p in run.iterdir()) == ["logs"]
    assert [p.name for p in (run / "logs").iterdir()] == ["mine.txt"]

    (run / "logs" / "mine.txt").unlink()
    (run / "logs").rmdir()
    with pytest.raises(UserError, match="NaN"), contextlib.redirect_stdout(io.StringIO()):
        train.main(["--data", str(tiny_data), "--output-dir", str(run), *FAST])  # TensorBoard writes logs/
    assert list(run.iterdir()) == []
    monkeypatch.undo()
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(["--data", str(tiny_data), "--output-dir", str(run), *FAST])  # not "holds a previous run"
    assert (run / "samples.png").exists() and (run / "model.safetensors").exists()


def test_a_resume_of_a_run_that_never_saved_starts_its_logs_afresh(tiny_data: Path, tmp_path: Path):
    """A run killed in its first epoch left config.yaml, samples.png and TensorBoard events: --resume
    starts from the beginning, and the killed attempt's points would show beside the new ones."""
    run = tmp_path / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(["--data", str(tiny_data), "--output-dir", str(run), *FAST])
    shutil.rmtree(run / "state")  # as if killed before its first save
    (run / "model.safetensors").unlink()
    (run / "best.safetensors").unlink(missing_ok=True)
    (run / "logs" / "finetune" / "events.out.tfevents.killed").write_bytes(b"")
    (run / "samples.png").write_bytes(b"a picture of the killed attempt")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train.main(["--data", str(tiny_data), "--output-dir", str(run), *FAST, "--resume"])
    assert "no saved state" in out.getvalue()
    assert not (run / "logs" / "finetune" / "events.out.tfevents.killed").exists()
    assert (run / "samples.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_written_at_once_by_two_nodes_sharing_a_home(tmp_path: Path, monkeypatch):
    """Another node finishing the demo dataset between this one's writing and renaming is no error."""
    from finetune.data import demo

    root = tmp_path / "lfw"
    real_replace = os.replace

    def other_node_first(src, dst):
        if Path(dst) == root:
            shutil.copytree(src, root)  # the other node's complete copy lands first
        return real_replace(src, dst)

    monkeypatch.setattr(demo.os, "replace", other_node_first)
    assert demo.demo_dataset(root) == root
    assert len(list((root / "train" / "face").iterdir())) == 70
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".lfw-")]  # no staging folder left


@pytest.mark.slow
def test_each_node_builds_its_own_caches_once(tmp_path: Path):
    """Two emulated nodes of two processes, each node with its own home: the demo data and the
    weights copy are made by one process a node (the per-node main), not by every process of a node."""
    import subprocess
    import sys

    from conftest import ROOT, free_port

    out = tmp_path / "out"
    out.mkdir()
    port = free_port()
    procs = []
    for node in (0, 1):
        home = tmp_path / f"node{node}"
        env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
               "FINETUNE_CACHE": str(home / "cache"), "TORCH_HOME": str(home / "torch")}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
             "--machine_rank", str(node), "--num_processes", "4", "--main_process_ip", "127.0.0.1",
             "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
             str(ROOT / "tests" / "node_probe.py"), str(out)],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-2000:] for log in logs)
    assert sorted(p.name for p in out.glob("done-*")) == [f"done-rank{r}" for r in range(4)]
    for what in ("demo", "weights"):
        builders = sorted(p.name for p in out.glob(f"{what}-*"))
        assert builders == [f"{what}-rank0", f"{what}-rank2"], what  # ranks 0 and 2: each node's first
        assert all(p.read_text() == "built\n" for p in out.glob(f"{what}-*"))
    for node in (0, 1):
        assert (tmp_path / f"node{node}" / "torch" / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth").is_file()
