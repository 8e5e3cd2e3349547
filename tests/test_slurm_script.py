"""slurm/finetune.sh and slurm/finetune_gpu.sh without a cluster (tests/test_slurm.py submits them to one)."""

from __future__ import annotations

import pytest
from conftest import ROOT, run_cmd

NOT_IN_SLURM = {name: None for name in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NNODES")}


@pytest.mark.parametrize("script", ["finetune.sh", "finetune_gpu.sh"])
def test_running_the_sbatch_script_directly_says_how_to_submit_it(script: str):
    proc = run_cmd(["bash", f"slurm/{script}", "--data", "/shared/DATA", "--epochs", "2"], env=NOT_IN_SLURM, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: slurm/{script} is an sbatch script (SLURM_JOB_ID is not set); submit it: "
                                   f"sbatch [options] slurm/{script} --data /shared/DATA --epochs 2")
    assert "unbound variable" not in proc.stderr and proc.stdout == ""


def test_gpu_script_repeats_the_main_scripts_sbatch_lines():
    """sbatch reads #SBATCH lines from the submitted script only: the GPU one repeats them all."""
    def sbatch_lines(name: str) -> set[str]:
        return {line for line in (ROOT / "slurm" / name).read_text().splitlines() if line.startswith("#SBATCH")}
    assert sbatch_lines("finetune.sh") <= sbatch_lines("finetune_gpu.sh")
    assert {"#SBATCH --cpus-per-gpu=8", "#SBATCH --mem-per-gpu=64G"} <= sbatch_lines("finetune_gpu.sh")
    # No CPU or memory default in the main script: sbatch would refuse --cpus-per-gpu next to it.
    assert not any("--cpus-per-task" in line or "--mem" in line for line in sbatch_lines("finetune.sh"))
