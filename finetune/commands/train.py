"""Fine-tune a pretrained torchvision classifier on an ImageFolder.

    accelerate launch train.py --data DATA --model resnet18 --weights DEFAULT --epochs 5
    accelerate launch train.py            # the offline demo: MobileNetV2 on LFW faces vs not faces

The same script runs under python, accelerate launch and torchrun, on CPU or GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

from finetune.config import TrainConfig, parse_config
from finetune.errors import UserError, run_cli


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``train.py`` with these arguments (``None``: ``sys.argv[1:]``); see ``train``."""
    # Flags first: --help and a bad flag answer at once, before torch (seconds to import) loads.
    return train(parse_config(argv, TrainConfig, description=__doc__.splitlines()[0]))


def train(config: TrainConfig) -> dict[str, Any]:
    """One training run: the run folder, the per-epoch history, the classes and the trained model.

    Raises:
        Stopped: on SIGTERM, SIGINT or SIGUSR1, from start-up on, after saving a state once training began.
    """
    from finetune.preemption import StopSignal  # first: a signal during the imports below stops cleanly too

    with StopSignal() as stop:
        return run_training(config, stop)


def run_training(config: TrainConfig, stop: "StopSignal") -> dict[str, Any]:
    """``train`` with the stop-signal handlers installed."""
    from accelerate.utils import set_seed

    from finetune.data import load_splits
    from finetune.demo import demo_dataset
    from finetune.models import build_classifier, check_model_name
    from finetune.preflight import apply_policy, check_dataset
    from finetune.reporting import Reporter
    from finetune.rundir import prepare_run_dir
    from finetune.runtime import build_accelerator
    from finetune.sanity import check_classes, check_model_input, probable_mistakes
    from finetune.loop import fit
    from finetune.resume import resumed_progress, run_setup
    from finetune.session import prepare_session
    from finetune.state import Progress, latest_state, load_training_state

    check_model_name(config.model)  # before anything is written
    check_model_input(config.model, config.image_size, config.batch_size, config.freeze)
    accelerator = build_accelerator(config.mixed_precision, config.grad_accum_steps, config.compile, config.threads,
                                    cpu=config.cpu)
    report = Reporter(enabled=accelerator.is_main_process)
    set_seed(config.seed)
    for note in probable_mistakes(config):
        report.print(f"warning: {note}")

    with accelerator.main_process_first():  # one process writes the demo dataset, the others reuse it
        data_dir = Path(config.data) if config.data else demo_dataset()
    if config.check_data:
        return check_data(data_dir, report)
    exclude, notes = apply_policy(check_dataset(data_dir, full=False), config.bad_data)
    splits = load_splits(data_dir, frozenset(exclude))  # also checks the layout: train/, test/, class folders
    check_classes(splits.classes, splits.train.root)
    for note in notes + splits.warnings:
        report.print(f"warning: {note}")
    run_dir = prepare_run_dir(config, data_dir, accelerator.is_main_process)
    setup = run_setup(config, splits.classes, [("train", splits.train), ("test", splits.test)],
                      accelerator.num_processes)
    progress, state = Progress(setup=setup.to_dict()), latest_state(run_dir) if config.resume else None
    if config.resume and state is None:
        report.print(f"no saved state in {run_dir}: starting from the beginning")
    if state is not None:
        progress = resumed_progress(state, setup)  # before the model is built: a changed run is named, not loaded
        if progress.epoch >= config.epochs:
            return finished(run_dir, progress, splits.test.root, report)

    with accelerator.main_process_first():  # one process downloads or copies the weights, the others reuse them
        clf = build_classifier(config.model, config.weights, splits.classes, image_size=config.image_size,
                               freeze_spec=config.freeze, reuse_classifier=config.reuse_classifier)
    session = prepare_session(config, accelerator, clf, splits)

    report.print(f"{config.model} from {clf.weights.name}: {len(splits.classes)} classes, "
                 f"{len(splits.train)} train / {len(splits.test)} test images from {data_dir}; "
                 f"{accelerator.num_processes} process(es) on {accelerator.device.type}, "
                 f"precision {accelerator.mixed_precision}")
    if clf.reused:
        report.print("reused pretrained classifier rows: " + ", ".join(f"{t} <- {s}" for t, s in clf.reused.items()))
    if clf.frozen:
        report.print("frozen: " + ("the whole backbone" if config.freeze == "backbone" else ", ".join(clf.frozen)))
    if getattr(session.epoch_sampler, "leaves_out_one", False):
        report.print(f"note: {len(splits.train)} images make a last batch of one, on which BatchNorm cannot train: "
                     "each epoch leaves out the last image of its shuffled order")
    if session.cached_features:
        report.print(f"linear probe on cached features ({session.cached_features} per image)")

    if state is not None:
        load_training_state(accelerator, state)
        report.print(f"resumed from {state} at epoch {progress.epoch + 1}, step {progress.step}")

    progress = fit(session, config, clf, splits.classes, run_dir, report, progress, stop)

    accelerator.wait_for_everyone()
    final = progress.history[-1] if progress.history else {}
    skipped = session.skipped.named if session.skipped else {}
    if skipped:
        report.print(f"skipped {len(skipped)} image(s) this process could not decode (--bad-data skip; named above)")
    report.print(f"saved {run_dir / 'model.safetensors'} (test accuracy "
                 f"{final.get('test_acc', float('nan')):.4f}); evaluate it with:\n"
                 f"  python eval.py --ckpt {run_dir / 'model.safetensors'} --data {splits.test.root}")
    accelerator.end_training()
    return {"run_dir": run_dir, "history": progress.history, "classes": splits.classes, "model": clf.net,
            "skipped": list(skipped)}


def finished(run_dir: Path, progress: Progress, test_dir: Path, report: Reporter) -> dict[str, Any]:
    """``--resume`` of a run that has trained all its epochs: say so, change nothing."""
    final = progress.history[-1] if progress.history else {}
    report.print(f"the run in {run_dir} is finished ({progress.epoch} epochs, test accuracy "
                 f"{final.get('test_acc', float('nan')):.4f}); nothing to resume. Evaluate it with:\n"
                 f"  python eval.py --ckpt {run_dir / 'model.safetensors'} --data {test_dir}")
    return {"run_dir": run_dir, "history": progress.history, "finished": True}


def check_data(data_dir: Path, report: Reporter) -> dict[str, Any]:
    """``--check-data``: decode every image, look for duplicates, print the report; fail on problems."""
    from finetune.data import load_splits
    from finetune.preflight import check_dataset
    from finetune.reporting import preflight_table

    load_splits(data_dir)  # the layout first: the report covers files only
    found = check_dataset(data_dir, full=True)
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
    report.print(f"{data_dir}: no problems that stop a run")
    return {"report": found}


def run() -> None:
    """The ``finetune-train`` console script."""
    sys.exit(run_cli(main))
