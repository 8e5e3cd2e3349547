"""study.py end to end at tiny sizes: every strategy, the records, the picture, resuming, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from finetune.commands import study
from finetune.errors import Stopped, UserError, run_cli
from finetune.training import run
from finetune.training.study import STRATEGIES, as_flags, strategy_fields
from tests.conftest import python_cmd, run_cmd

TINY = ["--model", "mobilenet_v3_small", "--weights", "none", "--image-size", "32", "--batch-size", "8",
        "--epochs", "2", "--num-workers", "0"]


@pytest.mark.slow
def test_every_strategy_then_an_interrupted_study_resumes(tiny_data: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "study"
    # First attempt: the third strategy is stopped by a signal (as a preempted job would be).
    calls: list[str] = []
    stop_at = [3]
    real_train = run.train

    def stopping_train(config, **kwargs):
        calls.append(Path(config.output_dir).name)
        if len(calls) in stop_at:
            raise Stopped("stopped by SIGTERM")
        return real_train(config, **kwargs)

    monkeypatch.setattr(run, "train", stopping_train)
    args = ["--data", str(tiny_data), *TINY, "--output-dir", str(out)]
    assert run_cli(study.main, args) == Stopped.exit_code
    done = json.loads((out / "study.json").read_text())["strategies"]
    assert [r["strategy"] for r in done] == list(STRATEGIES[:2])

    # Resumed: the finished two are not run again, the rest run to the end.
    calls.clear()
    stop_at.clear()
    result = study.main([*args, "--resume"])
    assert calls == list(STRATEGIES[2:])
    records = json.loads((out / "study.json").read_text())["strategies"]
    assert [r["strategy"] for r in records] == list(STRATEGIES)
    for r in records:
        assert {"strategy", "test_accuracy", "seconds", "checkpoint", "best_epoch", "trainable_params"} <= r.keys()
        assert 0 <= r["test_accuracy"] <= 1 and r["seconds"] > 0 and Path(r["checkpoint"]).is_file()
        assert len(r["history"]) == 2
    by_name = {r["strategy"]: r for r in records}
    # The strategies are what they say: a probe trains only the head, half-frozen trains less than all.
    assert by_name["linear-probe"]["trainable_params"] < by_name["freeze-half"]["trainable_params"] \
        < by_name["finetune"]["trainable_params"] == by_name["scratch"]["trainable_params"]
    assert by_name["classic"]["flags"] == as_flags(strategy_fields(2)["classic"])
    with Image.open(out / "curves.png") as img:
        img.load()
        assert img.size == (800, 320)
    report = (out / "report.md").read_text()
    assert "python study.py" in report and "curves.png" in report
    assert all(f"| {name} |" in report for name in STRATEGIES)
    assert result["results"].keys() == set(STRATEGIES)


def test_unknown_strategy_lists_the_valid_ones():
    proc = run_cmd(python_cmd("study.py", "--strategies", "finetune,magic"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "unknown strategy 'magic'" in proc.stderr and "lp-ft" in proc.stderr


@pytest.mark.slow
def test_bad_data_is_one_line(tmp_path: Path):
    proc = run_cmd(python_cmd("study.py", "--data", str(tmp_path / "nothing"), *TINY,
                              "--output-dir", str(tmp_path / "s")))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "nothing" in proc.stderr


def test_lp_ft_probe_grows_with_the_budget():
    assert strategy_fields(1)["lp-ft"] == {"probe_epochs": 0.5}
    assert strategy_fields(9)["lp-ft"] == {"probe_epochs": 3.0}
    with pytest.raises(UserError, match="choose from"):
        from finetune.training.study import parse_strategies

        parse_strategies(" , ")


@pytest.mark.slow
def test_study_under_accelerate_launch_with_two_processes(tiny_data: Path, tmp_path: Path):
    import socket
    import sys

    from tests.conftest import ROOT

    with socket.socket() as s:  # a free port for the process group
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    out = tmp_path / "study"
    proc = run_cmd([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", port, str(ROOT / "study.py"), "--data", str(tiny_data), *TINY,
                    "--epochs", "1", "--strategies", "finetune,linear-probe", "--output-dir", str(out)],
                   env={"ACCELERATE_USE_CPU": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((out / "study.json").read_text())["strategies"]
    assert [r["strategy"] for r in records] == ["finetune", "linear-probe"]
    assert proc.stdout.count("transfer strategies") == 1  # one table: only the main process reports
