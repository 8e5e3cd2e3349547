"""A training run from its resolved configuration: ``train(config) -> TrainResult``.

The one way a run starts: train.py, study.py, ``finetune.train`` and the tests all come here.
Read top to bottom: check what can be checked before anything is written, find the data and its
splits, let the recipe fill in what was left to it, choose the run folder, build the model and
the session, then the epoch loop (``loop.fit``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from finetune.config import TrainConfig
from finetune.data.demo import demo_dataset
from finetune.data.folders import Splits
from finetune.data.labelfiles import Columns
from finetune.data.preflight import apply_policy, cache_folder, check_dataset
from finetune.data.sources import load_splits
from finetune.models.build import Classifier, build_classifier, check_model_name
from finetune.report.console import Reporter
from finetune.report.tracking import check_tracker
from finetune.training import recipe
from finetune.training.calibrate import calibrate_run
from finetune.training.loop import fit
from finetune.training.resume import resumed_progress, run_setup
from finetune.training.rundir import default_run_dir, discard_unsaved, prepare_run_dir
from finetune.training.sanity import check_classes, check_model_input, probable_mistakes
from finetune.training.session import Session, prepare_session
from finetune.training.state import Progress, latest_state, load_training_state
from finetune.utils.phases import PhaseClock
from finetune.utils.preemption import StopSignal
from finetune.utils.runtime import build_accelerator, main_decides, num_workers, precision_name


@dataclass
class TrainResult:
    """What a run left.

    Attributes:
        run_dir: its folder (``model.safetensors`` is in it).
        history: one dict of figures per epoch (``epoch``, ``train_loss``, ``test_acc``, ...).
        classes: the class names in label order.
        eval_data: what ``eval.py --data`` takes to evaluate the run's test images again: the test
            folder, or the dataset folder where the test part was held out of it.
        model: the trained network (None where a resume found the run already finished).
        skipped: images that failed to decode during the run (``--bad-data skip``), on this process.
        finished: whether a ``--resume`` found the run already finished (nothing trained).
        main_process: whether this is the process that reports (the others stay quiet).
    """

    run_dir: Path
    history: list[dict[str, Any]]
    classes: list[str]
    eval_data: Path
    model: nn.Module | None = None
    skipped: list[str] = field(default_factory=list)
    finished: bool = False
    main_process: bool = True

    @property
    def final(self) -> dict[str, Any]:
        """The last epoch's figures (empty before the first)."""
        return self.history[-1] if self.history else {}


def train(config: TrainConfig, *, keep_process_group: bool = False) -> TrainResult:
    """One training run.

    Args:
        config: the configuration (the recipe resolves what it leaves to it).
        keep_process_group: leave the processes' group up for another run in the same processes
            (study.py); by default the run ends it, as a script should.

    Raises:
        UserError: bad values or data, with a one-line message.
        Stopped: on SIGTERM, SIGINT or SIGUSR1, from start-up on, after saving a state once training began.
    """
    with StopSignal() as stop:
        return _train(config, stop, keep_process_group)


def _train(config: TrainConfig, stop: StopSignal, keep_process_group: bool) -> TrainResult:
    clock = PhaseClock()
    clock.mark("run_start")  # the imports and the command line before it
    check_model_name(config.model)  # before anything is written
    check_tracker(config.log_with)
    # A shape-only copy of the model, on the meta device, answers in milliseconds whether it can
    # take this input size and batch: before the dataset scan, the weights download and the run
    # folder. The real model cannot be built this early: its head needs the data's classes.
    check_model_input(config.model, config.image_size, config.batch_size, config.freeze)
    accelerator = build_accelerator(config.mixed_precision, config.grad_accum_steps, config.compile, config.threads,
                                    cpu=config.cpu)
    report = Reporter(enabled=accelerator.is_main_process, every_seconds=config.log_every_seconds)
    set_seed(config.seed)
    for note in probable_mistakes(config):
        report.print(f"warning: {note}")

    data_dir = dataset_folder(accelerator, config)
    columns = Columns.from_config(config)  # of a label file
    exclude, notes = preflight(accelerator, data_dir, config.bad_data, columns)
    splits = load_splits(data_dir, frozenset(exclude), test_fraction=config.test_fraction,
                         val_fraction=config.val_fraction, split_seed=config.split_seed,
                         columns=columns, task=config.task)  # also checks the layout
    check_classes(splits.classes, getattr(splits.train, "label_file", splits.train.root))
    if config.task == "auto" and hasattr(splits.train, "label_file"):  # folders are single-label, no news
        report.print(f"task: {'multi-label' if splits.task == 'multilabel' else 'single-label'} ({splits.task_why})")
    config = dataclasses.replace(config, task=splits.task)
    for note in splits.notes:
        report.print(note)
    for note in notes + splits.warnings:
        report.print(f"warning: {note}")
    config, made = recipe.resolve(config, recipe.facts_of(config, splits.train.samples, len(splits.classes),
                                                          accelerator.num_processes))
    run = main_decides(accelerator, lambda: prepare_run_dir(config, data_dir))  # a refusal comes before the recipe
    default = default_run_dir(config, data_dir)
    if not (config.output_dir or config.resume) and run.path != default:
        report.print(f"run folder: {run.path} ({default} holds an earlier run; --output-dir names the folder, "
                     "--resume continues the newest run)")
    if made:
        report.print("recipe: " + "; ".join(f"--{c.name.replace('_', '-')} {_value(c.value)} ({c.why})"
                                            for c in made))
    try:
        return _train_into(run.path, config, accelerator, report, data_dir, splits, stop, keep_process_group,
                           skipped_before=len(exclude), clock=clock)
    except BaseException:
        if accelerator.is_main_process:  # a run that fails before its first save leaves nothing behind
            discard_unsaved(run)
        raise


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _train_into(run_dir: Path, config: TrainConfig, accelerator: Accelerator, report: Reporter, data_dir: Path,
                splits: Splits, stop: StopSignal, keep_process_group: bool, skipped_before: int,
                clock: PhaseClock) -> TrainResult:
    """Check a resume, build the model and the session, and train into ``run_dir``.

    ``skipped_before`` counts the images the preflight left out (``--bad-data skip``), for the summary.
    """
    # A test part held out of the training folder, and any split of a label file or Hugging Face
    # dataset, is evaluated by naming the dataset folder, label file or dataset: eval.py finds the
    # same files again (the checkpoint records which); a test folder by itself.
    record = splits.records["test"]
    eval_data = data_dir if record["carved"] or record.get("labels") or record.get("dataset") else Path(
        splits.test.root)
    held = [("train", splits.train), ("test", splits.test)] + ([("val", splits.val)] if splits.val else [])
    setup = run_setup(config, splits.classes, held, accelerator.num_processes)
    progress, state = Progress(setup=setup.to_dict()), latest_state(run_dir) if config.resume else None
    if config.resume and state is None:
        report.print(f"no saved state in {run_dir}: starting from the beginning")
    if state is not None:
        progress = resumed_progress(state, setup)  # before the model is built: a changed run is named, not loaded
        if progress.epoch >= config.epochs:
            # A kill during the calibration after the last epoch left checkpoints without it: fit them now.
            calibrate(accelerator, run_dir, splits, config, report, missing_only=True)
            return TrainResult(run_dir, progress.history, splits.classes, eval_data, finished=True,
                               main_process=accelerator.is_main_process)

    clf = build_model(accelerator, config, splits.classes)
    session = prepare_session(config=config, accelerator=accelerator, clf=clf, splits=splits, run_dir=run_dir,
                              progress=progress, report=report, stop=stop, clock=clock)
    announce(session, splits, data_dir)
    if state is not None:
        load_training_state(accelerator, state)
        report.print(f"resumed from {state} at epoch {progress.epoch + 1}, step {progress.step}")
    with clock("logging"):
        session.log.draw_samples(splits.train, session.train_loader.dataset, clf.preprocessing, config.seed)
    try:
        progress = fit(session)
    finally:
        with clock("logging"):
            session.log.finish()

    with clock("calibration"):
        calibrate(accelerator, run_dir, splits, config, report)
    skipped = session.skipped.named if session.skipped else {}
    if skipped or skipped_before:
        report.print(f"--bad-data skip left out {skipped_before} image(s) found before the run and "
                     f"{len(skipped)} this process could not decode during it (see above)")
    best = progress.history[progress.best_epoch - 1] if progress.best_epoch else {}
    if "val_acc" in best:
        report.print(f"best.safetensors: epoch {best['epoch']}, chosen on validation accuracy "
                     f"{best['val_acc']:.4f}; its test accuracy {best['test_acc']:.4f}")
    elif "val_map" in best:
        report.print(f"best.safetensors: epoch {best['epoch']}, chosen on validation mAP "
                     f"{best['val_map']:.4f}; its test mAP {best['test_map']:.4f}")
    if keep_process_group:
        for tracker in accelerator.trackers:
            tracker.finish()
    else:
        accelerator.end_training()
    if accelerator.is_main_process:
        clock.write(run_dir / "timings.json")
    return TrainResult(run_dir, progress.history, splits.classes, eval_data, model=clf.net, skipped=list(skipped),
                       main_process=accelerator.is_main_process)


def calibrate(accelerator: Accelerator, run_dir: Path, splits: Splits, config: TrainConfig, report: Reporter, *,
              missing_only: bool = False) -> None:
    """Each checkpoint's temperature and OOD threshold (``training.calibrate``), fitted by the main
    process while the others wait; ``missing_only``: only those of checkpoints that lack them."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # On a CPU, the forward passes take every core, and loader workers forked from a process that
        # holds a whole run copy its pages as it writes them: decoding here was 0.3 s faster (resnet18,
        # 192 images, 2 cores), so the automatic choice (-1) is none. A GPU needs the workers' decoding.
        on_gpu = accelerator.device.type == "cuda"
        workers = num_workers(config.num_workers, on_gpu) if on_gpu or config.num_workers >= 0 else 0
        lines = calibrate_run(run_dir, splits, device=accelerator.device, batch_size=config.batch_size,
                              num_workers=workers, missing_only=missing_only)
        for line in lines:
            report.print(line)
    accelerator.wait_for_everyone()


def announce(session: Session, splits: Splits, data_dir: Path) -> None:
    """What is about to train: the model, the data, the processes and what was done to the model."""
    config, clf, acc, report = session.config, session.clf, session.accelerator, session.report
    val = "" if splits.val is None else f"{len(splits.val)} val / "
    report.print(f"{config.model} from {clf.weights.name}: {len(splits.classes)} classes, "
                 f"{len(splits.train)} train / {val}{len(splits.test)} test images from {data_dir}; "
                 f"{acc.num_processes} process(es) on {acc.device.type}, "
                 f"precision {precision_name(acc.mixed_precision)}")
    if clf.reused:
        report.print("reused pretrained classifier rows: " + ", ".join(f"{t} <- {s}" for t, s in clf.reused.items()))
    if clf.frozen:
        report.print("frozen: " + ("the whole backbone" if config.freeze == "backbone" else ", ".join(clf.frozen)))
    if getattr(session.epoch_sampler, "leaves_out_one", False):
        report.print(f"note: {len(splits.train)} images make a last batch of one, on which BatchNorm cannot train: "
                     "each epoch leaves out the last image of its shuffled order")
    if session.cached_features:
        report.print(f"linear probe on cached features ({session.cached_features} per image)")


def dataset_folder(accelerator: Accelerator, config: TrainConfig) -> Path:
    """``--data``, or the demo dataset, which one process a node writes into its cache (nodes need
    not share a home folder); the node's other processes then reuse it."""
    with accelerator.local_main_process_first():
        return Path(config.data) if config.data else demo_dataset()


def build_model(accelerator: Accelerator, config: TrainConfig, classes: list[str]) -> Classifier:
    """The classifier to train; one process a node downloads or copies the weights into its
    torch.hub cache, the node's other processes then load that copy."""
    with accelerator.local_main_process_first():
        return build_classifier(config.model, config.weights, classes, image_size=config.image_size,
                                freeze_spec=config.freeze, reuse_classifier=config.reuse_classifier)


def preflight(accelerator: Accelerator, data_dir: Path, bad_data: str,
              columns: Columns) -> tuple[set[str], list[str]]:
    """The quick preflight: the files to leave out and the lines to print (``preflight.apply_policy``).

    The main process reads the headers (those of files unchanged since the last start come from
    its cache); every process receives what it found.
    """
    return main_decides(accelerator, lambda: apply_policy(
        check_dataset(data_dir, full=False, cache=cache_folder(data_dir), columns=columns), bad_data))
