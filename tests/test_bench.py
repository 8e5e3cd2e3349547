"""The benchmarks still run (tiny smoke runs: no figure is checked here, only that each side ran
and the ratios were written)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_cmd


@pytest.mark.parametrize("script, args, keys", [
    ("throughput.py", ["--images", "32", "--epochs", "1"], ["finetune_over_classic", "finetune_over_compute"]),
    ("eval_speed.py", ["--images", "32"], ["finetune_over_plain", "agreement"]),
    ("linear_probe.py", ["--epochs", "2", "--image-size", "64"], ["full_over_cached"]),
])
def test_benchmark_smoke_run(script: str, args: list[str], keys: list[str], tmp_path: Path):
    out = tmp_path / "out.json"
    proc = run_cmd([sys.executable, str(ROOT / "bench" / script), *args, "--out", str(out)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in keys:
        assert result[key] > 0, key
