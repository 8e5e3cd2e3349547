"""launch/: every config loads in Accelerate; the CPU ones run train.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from conftest import FAST, ROOT, run_cmd, write_image_folder

CONFIGS = sorted((ROOT / "launch").glob("*.yaml"))


def test_the_five_targets_are_there():
    names = [p.stem for p in CONFIGS]
    assert names == ["cpu", "cpu_ddp", "gpu_bf16", "multi_gpu_ddp_bf16", "multi_node"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads(path: Path):
    config = load_config_from_file(str(path))
    assert config.num_processes >= 1 and config.mixed_precision in ("no", "bf16")
    if "cpu" in path.stem:
        assert config.use_cpu


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
                    "--main_process_port", "29631", str(ROOT / "train.py"), "--data", str(data),
                    "--output-dir", str(tmp_path / "run"), *FAST], env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{processes} process(es) on cpu" in proc.stdout


def test_install_writes_a_default_config_so_a_plain_launch_does_not_warn(tmp_path: Path):
    """A plain `accelerate launch train.py` printed "--num_processes was set to a value of 0"."""
    line = next(l for l in (ROOT / "scripts" / "install.sh").read_text().splitlines() if "accelerate config default" in l)
    venv = Path(sys.executable).parent.parent
    env = {"HF_HOME": str(tmp_path / "hf")}
    assert run_cmd(["bash", "-c", line.replace(".venv/", f"{venv}/")], env=env).returncode == 0
    assert (tmp_path / "hf" / "accelerate" / "default_config.yaml").is_file()
    proc = run_cmd([sys.executable, "-m", "accelerate.commands.launch", str(ROOT / "train.py"), "--help"], env=env)
    assert proc.returncode == 0 and "usage:" in proc.stdout
    assert "num_processes" not in proc.stderr and "mixed_precision" not in proc.stderr, proc.stderr
