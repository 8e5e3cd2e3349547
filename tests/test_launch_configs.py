"""launch/: every config launches the processes it promises, with its precision; the CPU ones run train.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from conftest import FAST, ROOT, free_port, run_cmd, write_image_folder

CONFIGS = sorted((ROOT / "launch").glob("*.yaml"))


def test_the_five_targets_are_there():
    names = [p.stem for p in CONFIGS]
    assert names == ["cpu", "cpu_ddp", "gpu_bf16", "multi_gpu_ddp_bf16", "multi_node"]


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_launches_its_processes_with_its_precision(path: Path, tmp_path: Path):
    """Each config through accelerate launch itself (no GPU needed: the probe only reads what the
    launcher handed it). multi_node's machines are two launchers on this host."""
    config = load_config_from_file(str(path))
    assert config.mixed_precision in ("no", "bf16") and config.use_cpu == ("cpu" in path.stem)
    port = str(free_port())
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path), "--main_process_port", port]
    ranks = [[]] if config.num_machines == 1 else [["--machine_rank", str(r), "--main_process_ip", "127.0.0.1"]
                                                   for r in range(config.num_machines)]
    # As the config's own comment says to launch it: cpu_ddp.yaml with ACCELERATE_USE_CPU=1.
    env = {**os.environ, **({"ACCELERATE_USE_CPU": "1"} if path.stem == "cpu_ddp" else {})}
    procs = [subprocess.Popen([*launch, *rank, str(ROOT / "tests" / "launch_probe.py"), str(tmp_path)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in ranks]
    for proc in procs:
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out[-3000:]
    seen = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert len(seen) == config.num_processes
    assert sorted(int(s["RANK"] or 0) for s in seen) == list(range(config.num_processes))
    assert all(int(s["WORLD_SIZE"] or 1) == config.num_processes for s in seen)
    assert all(s["ACCELERATE_MIXED_PRECISION"] == config.mixed_precision for s in seen)
    assert all((s["ACCELERATE_USE_CPU"] in ("True", "1")) == config.use_cpu for s in seen)


@pytest.mark.slow
@pytest.mark.parametrize("name, env, processes", [
    ("cpu", {}, 1),
    ("cpu_ddp", {"ACCELERATE_USE_CPU": "1"}, 2),
])
def test_cpu_configs_run_train(name: str, env: dict, processes: int, tmp_path: Path):
    data = tmp_path / "data"
    write_image_folder(data / "train", {"a": 4, "b": 4})
    write_image_folder(data / "test", {"a": 2, "b": 2}, seed=1)
    proc = run_cmd([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / f"{name}.yaml"),
                    "--main_process_port", str(free_port()), str(ROOT / "train.py"), "--data", str(data),
                    "--output-dir", str(tmp_path / "run"), *FAST], env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{processes} process(es) on cpu" in proc.stdout


@pytest.mark.slow
def test_install_writes_a_default_config_so_a_plain_launch_does_not_warn(tmp_path: Path):
    """A plain `accelerate launch train.py` printed "--num_processes was set to a value of 0"."""
    line = next(text for text in (ROOT / "scripts" / "install.sh").read_text().splitlines()
                if "accelerate config default" in text)
    venv = Path(sys.executable).parent.parent
    env = {"HF_HOME": str(tmp_path / "hf")}
    assert run_cmd(["bash", "-c", line.replace(".venv/", f"{venv}/")], env=env).returncode == 0
    assert (tmp_path / "hf" / "accelerate" / "default_config.yaml").is_file()
    proc = run_cmd([sys.executable, "-m", "accelerate.commands.launch", str(ROOT / "train.py"), "--help"], env=env)
    assert proc.returncode == 0 and "usage:" in proc.stdout
    assert "num_processes" not in proc.stderr and "mixed_precision" not in proc.stderr, proc.stderr
