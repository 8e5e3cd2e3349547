"""Fine-tune a pretrained torchvision classifier on an ImageFolder.

    accelerate launch train.py --data DATA --model resnet18 --weights DEFAULT --epochs 5
    accelerate launch train.py            # the offline demo: MobileNetV2 on LFW faces vs not faces

The same script runs under python, accelerate launch and torchrun, on CPU or GPU. The run itself
is ``finetune.training.run.train``; this command parses the flags, calls it, and says what to do next.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from finetune.config import TrainConfig, parse_config
from finetune.errors import UserError, leave, run_cli
from finetune.utils.allocator import keep_freed_memory

if TYPE_CHECKING:  # the module itself stays torch-free: --help answers before torch loads
    from finetune.training.run import TrainResult


def main(argv: Sequence[str] | None = None, *, keep_process_group: bool = False) -> TrainResult | dict[str, Any]:
    """``train.py`` with these arguments (``None``: ``sys.argv[1:]``): the run's ``TrainResult``, or
    with ``--check-data`` the preflight's report (``{"report": ...}``)."""
    # Flags first: --help and a bad flag answer at once, before torch (seconds to import) loads.
    config = parse_config(argv, TrainConfig, description=__doc__.splitlines()[0])
    keep_freed_memory()  # this command's process, before it allocates tensors or forks workers
    if config.check_data:
        return check_data(config)
    if config.plots:  # matplotlib loads in the painter's process on the core that torch's import leaves idle
        from finetune.report import painter  # torch-free, like this module: before torch loads

        painter.start()
    from finetune.training.run import train  # after the flags: torch loads here

    result = train(config, keep_process_group=keep_process_group)
    if result.main_process:
        print(summary(result, _command("eval")))
    return result


def summary(result: TrainResult, eval_command: str) -> str:
    """The run's last lines: where the model is, its test accuracy, and how to evaluate it."""
    checkpoint = result.run_dir / "model.safetensors"
    final = result.final
    if "test_map" in final:  # multi-label: mAP is the headline
        accuracy = f"test mAP {final['test_map']:.4f}, micro-F1 {final['test_f1']:.4f}"
    else:
        accuracy = f"test accuracy {final.get('test_acc', float('nan')):.4f}"
    evaluate = f"  {eval_command} --ckpt {checkpoint} --data {result.eval_data}"
    if result.finished:
        return (f"the run in {result.run_dir} is finished ({len(result.history)} epochs, {accuracy}); "
                f"nothing to resume. Evaluate it with:\n{evaluate}")
    return f"saved {checkpoint} ({accuracy}); evaluate it with:\n{evaluate}"


def _command(name: str) -> str:
    """How the user runs command ``name``: ``python eval.py`` from a checkout's script, or the
    installed ``finetune-eval`` where this process is that kind of console script."""
    program = Path(sys.argv[0]).name if sys.argv else ""
    return f"finetune-{name}" if program.startswith("finetune-") else f"python {name}.py"


def check_data(config: TrainConfig) -> dict[str, Any]:
    """``--check-data``: decode every image, look for duplicates, print the report; fail on problems."""
    # loaded here, not at the top: --help answers before torch loads
    from finetune.data.demo import demo_dataset
    from finetune.data.hfdatasets import is_hf_data, read_rows
    from finetune.data.labelfiles import Columns, is_label_file, read_table
    from finetune.data.preflight import check_dataset
    from finetune.data.sources import load_splits
    from finetune.report.console import Reporter, preflight_table

    data_dir = Path(config.data) if config.data else demo_dataset()
    columns = Columns.from_config(config)  # of a label file
    report = Reporter()
    label_file = is_label_file(data_dir) or is_hf_data(data_dir)  # rows, with labels
    if is_label_file(data_dir):
        read_table(data_dir, columns)  # its rows first: missing images are the report's to name
    elif label_file:
        read_rows(data_dir, columns)  # the dataset's columns and splits first: its images are the report's
    else:
        load_splits(data_dir)  # the layout first: the report covers files only
    found = check_dataset(data_dir, full=True, columns=columns)
    report.print(preflight_table(found.counts))
    for path, why in found.bad:
        report.print(f"bad image: {path}: {why}")
    for path, fmt in found.wrong_extension:
        report.print(f"wrong extension: {path} holds {fmt}")
    for train_path, test_path in found.duplicates:
        report.print(f"duplicate: {test_path} is {train_path}")
    for note in found.warnings:
        report.print(f"warning: {note}")
    if found.bad:
        raise UserError(f"{data_dir}: {len(found.bad)} image(s) cannot be used")
    if label_file:
        load_splits(data_dir, columns=columns, task=config.task)  # its splits: labels of val or test rows that train lacks, ...
    report.print(f"{data_dir}: no problems that stop a run")
    return {"report": found}


def run() -> None:
    """The ``finetune-train`` console script."""
    leave(run_cli(main))
