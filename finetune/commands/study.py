"""Compare transfer strategies on one dataset: the classic chapter's whole experiment in one command.

    python study.py --data DATA [--model M] [--epochs N] [--strategies finetune,scratch,...] [--output-dir DIR]
    python study.py                    # on the built-in demo (LFW faces vs not faces)

Every strategy runs through train.py's own run (``finetune.training.run.train``) on the same data, budget and seed, in DIR/STRATEGY.
Writes DIR/study.json, DIR/curves.png and DIR/report.md; --resume skips finished strategies and
resumes an interrupted one. Works under accelerate launch and in slurm/finetune.sh (FINETUNE_SCRIPT=study.py).
"""

from __future__ import annotations

import functools
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from finetune.config import check_values, option, parse_config
from finetune.errors import leave, run_cli


@dataclass
class StudyConfig:
    data: str | None = option(None, "dataset folder (as train.py takes it); omitted: the built-in demo")
    model: str = option("mobilenet_v2", "the network every strategy starts from")
    weights: str = option("IMAGENET1K_V1", "its pretrained weights (scratch uses none)")
    epochs: int = option(5, "the budget of every strategy", minimum=1)
    image_size: int = option(224, "training crop size in pixels", minimum=1)
    batch_size: int = option(32, "images per process per step (classic uses the chapter's 128)", minimum=1)
    seed: int = option(0, "the seed every strategy shares")
    strategies: str = option("finetune,scratch,linear-probe,lp-ft,freeze-half,classic",
                             "comma-separated: finetune, scratch, linear-probe, lp-ft, freeze-half, classic")
    output_dir: str | None = option(None, "study folder (default runs/study-MODEL-DATA)")
    resume: bool = option(False, "skip finished strategies, resume an interrupted one")
    num_workers: int = option(-1, "data-loading workers per process (-1: matched to the CPU cores)")
    cpu: bool = option(False, "run on the CPU even where a GPU is visible")

    def __post_init__(self) -> None:
        check_values(self)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    config: StudyConfig = parse_config(argv, StudyConfig, description=__doc__.splitlines()[0])
    # After the flags: --help and a bad flag answer before torch and friends load.
    from finetune.config import TrainConfig
    from finetune.data.demo import demo_dataset
    from finetune.report.console import Reporter, study_table
    from finetune.report.plots import save_png, study_curves_png
    from finetune.training import study
    from finetune.training.run import train
    from finetune.utils.files import atomic_write_text
    from finetune.utils.runtime import process_state

    strategies = study.parse_strategies(config.strategies)
    state = process_state(cpu=config.cpu)
    report = Reporter(enabled=state.is_main_process)
    with state.main_process_first():
        data = Path(config.data) if config.data else demo_dataset()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{config.model}-{data.resolve().name}")
    out_dir = Path(config.output_dir) if config.output_dir else Path("runs") / f"study-{name}"
    common = TrainConfig(data=str(data), model=config.model, weights=config.weights, epochs=config.epochs,
                         image_size=config.image_size, batch_size=config.batch_size, seed=config.seed,
                         num_workers=config.num_workers, cpu=config.cpu)
    command = shlex.join(["python", "study.py", *(sys.argv[1:] if argv is None else argv)])

    def announce(result: Any) -> None:
        report.print(f"{result.strategy}: test {result.metric} {result.test_accuracy:.4f} in {result.seconds:.1f} s")

    # One process group for all the runs: each run would otherwise end it for the next.
    results = study.run_study(functools.partial(train, keep_process_group=True), strategies, common, out_dir,
                              config.resume, state.is_main_process, command, on_result=announce)
    if state.is_main_process:
        report.print(study_table(list(results.values())))
        save_png(out_dir / "curves.png", study_curves_png({n: r["history"] for n, r in results.items()}))
        atomic_write_text(out_dir / "report.md", study.report_markdown(results, command))
        report.print(f"wrote {out_dir / 'study.json'}, {out_dir / 'curves.png'} and {out_dir / 'report.md'}")
    state.destroy_process_group()
    return {"output_dir": out_dir, "results": results}


def run() -> None:
    """The ``finetune-study`` console script."""
    leave(run_cli(main))
