"""The classic chapter's experiment: several transfer strategies on the same data, budget and seed.

Each strategy is a set of ``TrainConfig`` fields that replace the study's common configuration,
run through ``run.train`` (train.py's own run) in a run folder of its own.
The results go to ``study.json`` (rewritten after each strategy, so an interrupted study resumes
where it stopped), ``curves.png`` and ``report.md``.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from finetune.config import TrainConfig
from finetune.errors import UserError
from finetune.training.run import TrainResult
from finetune.utils.files import atomic_write_text

# The chapter's recipe on a mean loss: plain SGD at 5e-5 on a loss summed over 128 images is 6.4e-3
# on their mean; its weight decay 1e-3 then acts as 1e-3 / 128 per unit of learning rate. No
# warmup, no decay, the classic augmentation, decay on every parameter, no BatchNorm recalibration.
CHAPTER = {"optimizer": "sgd", "momentum": 0.0, "lr": 0.0064, "batch_size": 128, "weight_decay": 7.8e-6,
           "decay_norm_and_bias": True, "augment": "classic", "warmup_epochs": 0.0, "probe_epochs": 0.0,
           "schedule": "constant", "recalibrate_bn_batches": 0}


def strategy_fields(epochs: int) -> dict[str, dict[str, Any]]:
    """The ``TrainConfig`` fields of each strategy, in the order the study runs them, for a budget
    of ``epochs``."""
    return {
        "finetune": {},  # the defaults
        "scratch": {"weights": "none", "probe_epochs": 0.0},
        "linear-probe": {"freeze": "backbone", "augment": "none"},
        # A probe for a third of the budget (at least half an epoch), then everything trains.
        "lp-ft": {"probe_epochs": float(max(0.5, round(epochs / 3)))},
        "freeze-half": {"freeze": "0.5"},
        "classic": CHAPTER,
    }


def as_flags(fields: dict[str, Any]) -> list[str]:
    """``fields`` as the train.py flags that set them (for the records and report.md)."""
    flags: list[str] = []
    for name, value in fields.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            flags += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return flags


STRATEGIES = tuple(strategy_fields(1))


def parse_strategies(text: str) -> list[str]:
    """A comma-separated list of strategy names, checked; UserError lists the valid ones."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or not names:
        raise UserError(f"unknown strategy '{unknown[0] if unknown else text}'; choose from {', '.join(STRATEGIES)}")
    return list(dict.fromkeys(names))


@dataclass
class Result:
    """One strategy's outcome, as study.json records it."""

    strategy: str
    test_accuracy: float  # after the last epoch
    best_accuracy: float
    best_epoch: int
    seconds: float  # wall time of the whole run
    images_per_s: float  # mean training speed over the epochs
    trainable_params: int | None
    checkpoint: str
    flags: list[str]
    history: list[dict[str, Any]]
    metric: str = "accuracy"  # what test_accuracy and best_accuracy hold: "mAP" for a multi-label run


def summarise(strategy: str, flags: list[str], out: TrainResult, seconds: float) -> Result:
    """A ``Result`` from what the run returned."""
    history = out.history
    key = "test_map" if history and "test_map" in history[0] else "test_acc"  # multi-label: mAP is the headline
    best = max(range(len(history)), key=lambda i: history[i][key])
    # A run that had already finished (a study resumed just after it) is not rebuilt: no model.
    trainable = sum(p.numel() for p in out.model.parameters() if p.requires_grad) if out.model is not None else None
    return Result(strategy=strategy, test_accuracy=history[-1][key], best_accuracy=history[best][key],
                  best_epoch=history[best]["epoch"], seconds=round(seconds, 2),
                  images_per_s=round(sum(r["images_per_s"] for r in history) / len(history), 2),
                  trainable_params=trainable, checkpoint=str(out.run_dir / "model.safetensors"),
                  flags=flags, history=history, metric="mAP" if key == "test_map" else "accuracy")


def load_results(path: Path) -> dict[str, dict[str, Any]]:
    """The finished strategies recorded in ``study.json``, by name (none if there is no file)."""
    if not path.is_file():
        return {}
    try:
        records = json.loads(path.read_text(encoding="utf-8"))["strategies"]
        return {r["strategy"]: r for r in records}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"cannot read {path}: {err}; remove it or use another --output-dir") from None


def save_results(path: Path, command: str, common: list[str], results: dict[str, dict[str, Any]]) -> None:
    atomic_write_text(path, json.dumps({"command": command, "common_flags": common,
                                        "strategies": list(results.values())}, indent=1))


def run_study(train: Callable[[TrainConfig], TrainResult], strategies: list[str], common: TrainConfig,
              out_dir: Path, resume: bool, is_main: bool, command: str,
              on_result: Callable[[Result], None] = lambda r: None) -> dict[str, dict[str, Any]]:
    """Run each strategy: ``common`` with the strategy's fields replaced; return the records.

    Args:
        train: the run (``run.train``).
        strategies: names from ``STRATEGIES``, in order.
        common: the configuration every run shares (data, model, epochs, seed, ...); its epochs
            are the budget (LP-FT sizes its probe from it).
        out_dir: the study folder; strategy S runs in ``out_dir/S``.
        resume: skip strategies that study.json records as finished, resume an interrupted one.
        is_main: whether this process writes study.json (under several processes, all run, one writes).
        command: the command line, for the records.
        on_result: called with each newly finished strategy's ``Result``.
    """
    record = out_dir / "study.json"
    results = load_results(record) if resume else {}
    fields_of = strategy_fields(common.epochs)
    common_flags = as_flags({f.name: getattr(common, f.name) for f in dataclasses.fields(common)
                             if getattr(common, f.name) != f.default and f.name != "output_dir"})
    for name in strategies:
        if name in results:
            continue
        fields = fields_of[name]
        config = dataclasses.replace(common, **fields, output_dir=str(out_dir / name), resume=resume)
        start = time.perf_counter()
        result = summarise(name, as_flags(fields), train(config), time.perf_counter() - start)
        results[name] = result.__dict__
        if is_main:
            save_results(record, command, common_flags, results)
        on_result(result)
    return {name: results[name] for name in strategies}


def report_markdown(results: dict[str, dict[str, Any]], command: str) -> str:
    """report.md: the command, the table and the curves."""
    lines = ["# Transfer strategies compared", "", "Made by:", "", f"    {command}", "",
             "| strategy | test accuracy | best (epoch) | seconds | images/s | trainable parameters |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results.values():
        lines.append(f"| {r['strategy']} | {r['test_accuracy']:.4f} | {r['best_accuracy']:.4f} ({r['best_epoch']}) | "
                     f"{r['seconds']:.1f} | {r['images_per_s']:.1f} | {_count(r['trainable_params'])} |")
    lines += ["", "Each strategy's extra flags:", ""]
    lines += [f"- `{r['strategy']}`: `{shlex.join(r['flags']) or '(the defaults)'}`" for r in results.values()]
    lines += ["", "![test accuracy and train loss per epoch](curves.png)", ""]
    return "\n".join(lines)


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"
