"""Fine-tune a pretrained torchvision classifier on an ImageFolder.

    accelerate launch train.py --data DATA --model resnet18 --weights DEFAULT --epochs 5
    accelerate launch train.py            # the offline demo: MobileNetV2 on LFW faces vs not faces

The same script runs under python, accelerate launch and torchrun, on CPU or GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from finetune.config import TrainConfig, parse_config
from finetune.errors import UserError, run_cli

if TYPE_CHECKING:  # the module itself stays torch-free: --help answers before torch loads
    from accelerate import Accelerator

    from finetune.data.folders import Splits
    from finetune.utils.preemption import StopSignal
    from finetune.models.build import Classifier
    from finetune.report.console import Reporter


def main(argv: Sequence[str] | None = None, *, keep_process_group: bool = False) -> dict[str, Any]:
    """``train.py`` with these arguments (``None``: ``sys.argv[1:]``); see ``train``."""
    # Flags first: --help and a bad flag answer at once, before torch (seconds to import) loads.
    return train(parse_config(argv, TrainConfig, description=__doc__.splitlines()[0]),
                 keep_process_group=keep_process_group)


def train(config: TrainConfig, *, keep_process_group: bool = False) -> dict[str, Any]:
    """One training run: the run folder, the per-epoch history, the classes and the trained model.

    Args:
        config: the resolved configuration.
        keep_process_group: leave the processes' group up for another run in the same processes
            (study.py); by default the run ends it, as a script should.

    Raises:
        Stopped: on SIGTERM, SIGINT or SIGUSR1, from start-up on, after saving a state once training began.
    """
    from finetune.utils.preemption import StopSignal  # first: a signal during the imports below stops cleanly too

    with StopSignal() as stop:
        return run_training(config, stop, keep_process_group)


def run_training(config: TrainConfig, stop: "StopSignal", keep_process_group: bool = False) -> dict[str, Any]:
    """``train`` with the stop-signal handlers installed."""
    from accelerate.utils import set_seed

    from finetune.training import recipe
    from finetune.data.folders import load_splits
    from finetune.models.build import check_model_name
    from finetune.report.console import Reporter
    from finetune.training.rundir import discard_unsaved, prepare_run_dir
    from finetune.utils.runtime import build_accelerator, main_decides
    from finetune.training.sanity import check_classes, check_model_input, probable_mistakes

    check_model_name(config.model)  # before anything is written
    from finetune.report.tracking import check_tracker

    check_tracker(config.log_with)
    check_model_input(config.model, config.image_size, config.batch_size, config.freeze)
    accelerator = build_accelerator(config.mixed_precision, config.grad_accum_steps, config.compile, config.threads,
                                    cpu=config.cpu)
    report = Reporter(enabled=accelerator.is_main_process, every_seconds=config.log_every_seconds)
    set_seed(config.seed)
    for note in probable_mistakes(config):
        report.print(f"warning: {note}")

    data_dir = dataset_folder(accelerator, config)
    if config.check_data:
        return check_data(data_dir, report)
    exclude, notes = preflight(accelerator, data_dir, config.bad_data)
    splits = load_splits(data_dir, frozenset(exclude), test_fraction=config.test_fraction,
                         val_fraction=config.val_fraction, split_seed=config.split_seed)  # also checks the layout
    check_classes(splits.classes, splits.train.root)
    for note in splits.notes:
        report.print(note)
    for note in notes + splits.warnings:
        report.print(f"warning: {note}")
    config, made = recipe.resolve(config, recipe.facts_of(config, splits.train.samples, len(splits.classes),
                                                          accelerator.num_processes))
    if made:
        report.print("recipe: " + "; ".join(f"--{c.name.replace('_', '-')} {c.value:g} ({c.why})"
                                            if isinstance(c.value, float) else
                                            f"--{c.name.replace('_', '-')} {c.value} ({c.why})" for c in made))
    run = main_decides(accelerator, lambda: prepare_run_dir(config, data_dir))
    run_dir = run.path
    try:
        return train_into(run_dir, config, accelerator, report, data_dir, splits, stop, keep_process_group,
                          skipped_before=len(exclude))
    except BaseException:
        if accelerator.is_main_process:  # a run that fails before its first save leaves nothing behind
            discard_unsaved(run)
        raise


def train_into(run_dir: Path, config: TrainConfig, accelerator: Accelerator, report: Reporter, data_dir: Path,
               splits: Splits, stop: "StopSignal", keep_process_group: bool = False,
               skipped_before: int = 0) -> dict[str, Any]:
    """Check a resume, build the model and train it into ``run_dir`` (``train``'s second half).

    ``skipped_before`` counts the images the preflight left out (``--bad-data skip``), for the summary.
    """
    from finetune.training.loop import fit
    from finetune.training.resume import resumed_progress, run_setup
    from finetune.training.session import prepare_session
    from finetune.training.state import Progress, latest_state, load_training_state
    from finetune.utils.runtime import precision_name

    held = [("train", splits.train), ("test", splits.test)] + ([("val", splits.val)] if splits.val else [])
    setup = run_setup(config, splits.classes, held, accelerator.num_processes)
    progress, state = Progress(setup=setup.to_dict()), latest_state(run_dir) if config.resume else None
    if config.resume and state is None:
        report.print(f"no saved state in {run_dir}: starting from the beginning")
    if state is not None:
        progress = resumed_progress(state, setup)  # before the model is built: a changed run is named, not loaded
        if progress.epoch >= config.epochs:
            return finished(run_dir, progress, splits.test.root, report)

    clf = build_model(accelerator, config, splits.classes)
    session = prepare_session(config, accelerator, clf, splits)

    report.print(f"{config.model} from {clf.weights.name}: {len(splits.classes)} classes, "
                 f"{len(splits.train)} train / {'' if splits.val is None else f'{len(splits.val)} val / '}"
                 f"{len(splits.test)} test images from {data_dir}; "
                 f"{accelerator.num_processes} process(es) on {accelerator.device.type}, "
                 f"precision {precision_name(accelerator.mixed_precision)}")
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

    from finetune.report.tracking import RunLog

    log = RunLog(accelerator, config, run_dir, len(session.train_loader),
                 (progress.epoch, progress.step) if progress.epoch or progress.step else None)
    log.draw_samples(splits.train, session.train_loader.dataset, clf.preprocessing, config.seed)
    progress = fit(session, config, clf, splits.classes, run_dir, report, progress, log, stop)

    accelerator.wait_for_everyone()
    final = progress.history[-1] if progress.history else {}
    skipped = session.skipped.named if session.skipped else {}
    if skipped or skipped_before:
        report.print(f"--bad-data skip left out {skipped_before} image(s) found before the run and "
                     f"{len(skipped)} this process could not decode during it (see above)")
    best = progress.history[progress.best_epoch - 1] if progress.best_epoch else {}
    if "val_acc" in best:
        report.print(f"best.safetensors: epoch {best['epoch']}, chosen on validation accuracy "
                     f"{best['val_acc']:.4f}; its test accuracy {best['test_acc']:.4f}")
    # A test part held out of the training folder is evaluated by naming the dataset folder:
    # eval.py holds out the same files again (the checkpoint records which).
    eval_data = data_dir if splits.records["test"]["carved"] else splits.test.root
    report.print(f"saved {run_dir / 'model.safetensors'} (test accuracy "
                 f"{final.get('test_acc', float('nan')):.4f}); evaluate it with:\n"
                 f"  python eval.py --ckpt {run_dir / 'model.safetensors'} --data {eval_data}")
    if keep_process_group:
        for tracker in accelerator.trackers:
            tracker.finish()
    else:
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


def dataset_folder(accelerator: Accelerator, config: TrainConfig) -> Path:
    """``--data``, or the demo dataset, which one process a node writes into its cache (nodes need
    not share a home folder); the node's other processes then reuse it."""
    from finetune.data.demo import demo_dataset

    with accelerator.local_main_process_first():
        return Path(config.data) if config.data else demo_dataset()


def build_model(accelerator: Accelerator, config: TrainConfig, classes: list[str]) -> Classifier:
    """The classifier to train; one process a node downloads or copies the weights into its
    torch.hub cache, the node's other processes then load that copy."""
    from finetune.models.build import build_classifier

    with accelerator.local_main_process_first():
        return build_classifier(config.model, config.weights, classes, image_size=config.image_size,
                                freeze_spec=config.freeze, reuse_classifier=config.reuse_classifier)


def preflight(accelerator: Accelerator, data_dir: Path, bad_data: str) -> tuple[set[str], list[str]]:
    """The quick preflight: the files to leave out and the lines to print (``preflight.apply_policy``).

    The main process reads the headers (those of files unchanged since the last start come from
    its cache); every process receives what it found.
    """
    from finetune.data.preflight import apply_policy, cache_folder, check_dataset
    from finetune.utils.runtime import main_decides

    return main_decides(accelerator, lambda: apply_policy(
        check_dataset(data_dir, full=False, cache=cache_folder(data_dir)), bad_data))


def check_data(data_dir: Path, report: Reporter) -> dict[str, Any]:
    """``--check-data``: decode every image, look for duplicates, print the report; fail on problems."""
    from finetune.data.folders import load_splits
    from finetune.data.preflight import check_dataset
    from finetune.report.console import preflight_table

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
