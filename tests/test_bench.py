"""The benchmarks still run (tiny smoke runs: no figure is checked here, only that each side ran
and the ratios were written). bench/throughput.py runs inside the GPU check's smoke run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_cmd

pytestmark = pytest.mark.slow  # benchmark scripts end to end


def ratio_of(result: dict, key: str, sides: str, top: str, bottom: str) -> bool:
    """Whether ``result[key]`` is the ratio of the two measured sides it names: a figure computed from
    this run's timings, not one written down."""
    return math.isfinite(result[key]) and result[key] == pytest.approx(result[sides][top] / result[sides][bottom])


@pytest.mark.parametrize("script, args, check", [
    ("eval_speed", ["--images", "32"],
     lambda r: ratio_of(r, "finetune_over_plain", "img_per_s", "finetune", "plain") and 0.9 <= r["agreement"] <= 1),
    ("linear_probe", ["--epochs", "2", "--image-size", "64"],
     lambda r: ratio_of(r, "full_over_cached", "seconds_per_epoch", "full_finetune", "probe_cached")),
    ("loader_speed", ["--images", "4", "--rounds", "1", "--workers", "1"],
     lambda r: all(math.isfinite(r[k]) and r[k] > 0 for k in ("train_now_over_before", "eval_now_over_before",
                                                               "train_rows_over_files", "eval_rows_over_files"))),
    ("inference_speed", ["--images", "8", "--repeats", "1", "--iters", "1"],
     lambda r: ratio_of(r, "predict_over_eval", "img_per_s", "predict", "eval")
     and r["eager_over_onnx_b1"] == r["runtimes"]["batch1"]["eager_over_onnxruntime"]),
    ("preflight_speed", ["--images", "300", "--rounds", "1"],
     lambda r: r["first_over_second"] == pytest.approx(r["first_s"] / r["second_s"])),
    ("serve_speed", ["--images", "8", "--seconds", "1", "--clients", "1", "4", "--repeats", "1",
                     "--model", "mobilenet_v3_small", "--image-size", "64"],
     lambda r: r["serve_over_predict"] == pytest.approx(r["levels"][-1]["img_per_s"] / r["predict"]["img_per_s"])
     and [level["clients"] for level in r["levels"]] == [1, 4]),
])
def test_benchmark_smoke_run(script: str, args: list[str], check, tmp_path: Path):
    out = tmp_path / "out.json"
    proc = run_cmd([sys.executable, "-m", f"bench.{script}", *args, "--out", str(out)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert check(json.loads(out.read_text())), out.read_text()[:2000]


def test_peer_benchmark_prints_the_ratio_of_whole_processes_and_the_projects_phases(tmp_path: Path):
    stand_in = tmp_path / "train.py"  # timm's train.py lives in its repository, not in the pip package
    stand_in.write_text("import sys, time\nassert '--data-dir' in sys.argv\ntime.sleep(0.5)\n")
    out = tmp_path / "out.json"
    proc = run_cmd([sys.executable, "-m", "bench.peer_timm", "--timm-train", str(stand_in), "--rounds", "1",
                    "--work", str(tmp_path / "work"), "--model", "mobilenet_v3_small", "--image-size", "32",
                    "--epochs", "1", "--out", str(out)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert result["summary"]["ratios"] == [round(row["timm"] / row["project"], 3)]
    assert result["summary"]["ratios_without_calibration"] == [
        round(row["timm"] / (row["project"] - row["phases"]["calibration"]), 3)]
    assert 0.5 < row["timm"] < row["project"]
    assert {"start-up", "train", "test", "saving", "calibration", "other"} <= set(row["phases"])
    assert sum(v for k, v in row["phases"].items() if k != "marks") == pytest.approx(row["project"])
    assert 0 < row["phases"]["marks"]["run_start"] < row["phases"]["marks"]["first_step"]
    assert "the project's run by phase" in proc.stdout and "NOT met" in proc.stdout


def test_gpu_check_script_smoke_run(tmp_path: Path):
    """The script a GPU lease runs, at tiny sizes on this machine: every step runs and passes, and what
    it leaves fits what a device run can bring back (at most 8 files)."""
    out = tmp_path / "out"
    proc = run_cmd(["bash", str(ROOT / "bench" / "gpu_check.sh")],
                   env={"SMOKE": "1", "OUT": str(out), "PYTHON": sys.executable}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    log = (out / "gpu_check.log").read_text()
    steps = ("env", "machine", "data", "train-bf16", "eval-bf16", "train-fp16", "eval-fp16", "train-no", "eval-no",
             "loader", "throughput-16")
    for step in steps:
        assert f"== {step}: " in log, step
    assert "FAILED" not in log and "all GPU checks passed" in log
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "loader_speed.json", "throughput-gpu-16.json"]
    for mp in ("bf16", "fp16", "no"):  # eval runs in each precision, as train did
        assert f"eval.py --ckpt {_data_dir(log)}/run-{mp}/model.safetensors --data {_data_dir(log)}/test --mixed-precision {mp}" in log
    requirements = [line for line in (ROOT / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    assert f"; imported {len(requirements)} requirements" in log  # the env step imports every one
    assert json.loads((out / "loader_speed.json").read_text())["train_now_over_before"] > 0
    result = json.loads((out / "throughput-gpu-16.json").read_text())
    assert result["finetune_over_classic"] > 0 and result["finetune_over_compute"] > 0
    assert result["settings"]["batch"] == 16


def _data_dir(log: str) -> str:
    """The temporary data folder the GPU check's log names."""
    import re
    return re.search(r"--data (\S+) --model resnet18", log).group(1)


@pytest.mark.slow
def test_sweep_quick_prints_the_grid_and_the_regret(tmp_path: Path):
    out = tmp_path / "sweep.json"
    proc = run_cmd([sys.executable, "-m", "bench.sweep_defaults", "--quick", "--jobs", "1",
                    "--work", str(tmp_path / "work"), "--out", str(out)], timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [row["case"] for row in result["rows"]] == ["lfw100 64px 1ep", "digits300 32px 1ep",
                                                       "shapes40 32px 1ep (mAP)"]
    assert [row["metric"] for row in result["rows"]] == ["accuracy", "accuracy", "mAP"]
    for row in result["rows"]:
        assert set(row["recipes"]) == {"chapter", "previous default", "mild", "none"}
        best = max([r["test"] for r in row["recipes"].values()] + [row["default"]["test"]])
        assert row["regret"] == pytest.approx(best - row["default"]["test"])
        assert "--augment" in row["default_flags"]
    assert "worst-case regret" in proc.stdout and "mean regret" in proc.stdout
    assert result["summary"]["worst_regret"] == max(row["regret"] for row in result["rows"])
