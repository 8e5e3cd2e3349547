"""Evaluate a checkpoint written by train.py on an ImageFolder.

    python eval.py --ckpt runs/NAME/model.safetensors --data DATA/test
    python eval.py --ckpt runs/NAME/model.safetensors     # the test folder the run was tested on

Everything needed to rebuild the model and its preprocessing comes from the checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from finetune.config import LABEL_FILE_HELP, PRECISIONS, TRACKERS, check_values, option, parse_config
from finetune.errors import UserError, leave, run_cli
from finetune.utils.allocator import keep_freed_memory

MISTAKES_SHOWN = 16


@dataclass
class EvalConfig:
    ckpt: str | None = option(None, "checkpoint written by train.py (model.safetensors), or its run folder",
                              path=True)
    data: str | None = option(None, "ImageFolder to evaluate (one sub-folder per class); "
                                  "a dataset folder with train/ and test/ (or val/) uses its test split; a label file "
                                  "its test rows (or the part the run held out of it); a Hugging Face dataset (hf:NAME, "
                                  "a save_to_disk folder, parquet files) its test split; omitted: the test folder "
                                  "recorded in the checkpoint, if its files are unchanged", path=True)
    image_column: str | None = option(None, LABEL_FILE_HELP["image_column"])
    label_column: str | None = option(None, LABEL_FILE_HELP["label_column"])
    label_sep: str | None = option(None, LABEL_FILE_HELP["label_sep"])
    label_columns: str | None = option(None, LABEL_FILE_HELP["label_columns"])
    split_column: str | None = option(None, LABEL_FILE_HELP["split_column"])
    output_dir: str | None = option(None, "where metrics.json and predictions.csv go (default: eval/ beside the "
                                          "checkpoint)", path=True)
    batch_size: int = option(64, "images per process per batch", minimum=1)
    num_workers: int = option(-1, "data-loading workers per process (-1: matched to the CPU cores)", minimum=0, auto=-1)
    threads: int = option(-1, "CPU compute threads per process (-1: the cores shared among this machine's processes)",
                          minimum=1, auto=-1)
    mixed_precision: str = option("auto", "auto: what the training's own test pass ran in (recorded in the "
                                          "checkpoint), else as train.py decides; or no, bf16, fp16",
                                  choices=PRECISIONS, false_means="no")
    cpu: bool = option(False, "run on the CPU even where a GPU is visible")
    channels_last: bool = option(True, "use the channels-last memory format")
    fold_batchnorm: bool = option(False, "fold BatchNorm into the convolutions: faster on CPUs, but an image at the "
                                         "decision boundary may then flip against the accuracy training printed")
    calibration: bool = option(True, "divide the logits by the temperature the checkpoint records (fitted on the "
                                     "run's validation split) before the softmax; --no-calibration: the raw softmax")
    plots: bool = option(True, "draw confusion.png, mistakes.png and reliability.png in the output folder")
    log_with: str = option("tensorboard", "experiment tracker for the pictures and accuracy: tensorboard (under "
                                        "OUTPUT/logs/), wandb, mlflow, aim or none", choices=TRACKERS)

    def __post_init__(self) -> None:
        check_values(self)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    # Flags first: --help and a bad flag answer at once, before torch (seconds to import) loads.
    config: EvalConfig = parse_config(argv, EvalConfig, description=__doc__.splitlines()[0])
    keep_freed_memory()  # this command's process, before it allocates tensors or forks workers
    # After the flags: --help and a bad flag answer before torch (seconds to import) loads.
    from finetune.data.evalsplit import recorded_split
    from finetune.data.folders import EVAL_SPLITS, find_split, image_folder, missing_classes, recorded_part
    from finetune.data.hfdatasets import eval_split as hf_eval_split
    from finetune.data.hfdatasets import is_hf_data
    from finetune.data.labelfiles import Columns, eval_split, is_label_file
    from finetune.data.loader import make_eval_loader
    from finetune.models.calibration import calibration_figures
    from finetune.models.inference import load_classifier
    from finetune.report.console import Reporter
    from finetune.report.metrics import summarise
    from finetune.report.tracking import check_tracker, start_trackers
    from finetune.training.engine import evaluate
    from finetune.training.rundir import ensure_writable
    from finetune.utils.files import atomic_write_text
    from finetune.utils.runtime import build_accelerator, num_workers

    if not config.ckpt:
        raise UserError("eval.py needs --ckpt FILE (and --data DIR, unless the checkpoint's own test folder is meant)")
    check_tracker(config.log_with)
    # The precision rule (models.inference): by default the training's own test pass's, so that the
    # accuracy agrees with the one training printed.
    clf = load_classifier(config.ckpt, mixed_precision=config.mixed_precision, channels_last=config.channels_last,
                          fold_batchnorm=config.fold_batchnorm, calibrated=config.calibration)
    classes, pre = clf.classes, clf.preprocessing
    accelerator = build_accelerator(clf.precision, cpu_threads=config.threads, cpu=config.cpu)
    report = Reporter(enabled=accelerator.is_main_process)
    out_dir = Path(config.output_dir) if config.output_dir else clf.path.parent / "eval"
    if accelerator.is_main_process:
        ensure_writable(out_dir)
    start_trackers(accelerator, config.log_with, out_dir / "logs", out_dir.name, own_run=True)  # each eval apart

    if config.data is None:  # the folder the run was tested on, as long as its files are the same
        dataset = recorded_split(clf.meta, classes, clf.path)
        data_dir = Path(dataset.root)
        where = getattr(dataset, "label_file", None) or getattr(dataset, "source", None)  # rows, else a folder
        if where:
            report.print(f"evaluating on {where}, the test images recorded in the checkpoint")
        elif clf.meta["splits"]["test"].get("carved"):
            report.print(f"evaluating the {len(dataset.samples)} images held out of {data_dir} for testing, "
                         "as recorded in the checkpoint")
        else:
            report.print(f"evaluating on {data_dir}, the test folder recorded in the checkpoint")
    elif is_label_file(config.data) or is_hf_data(config.data):
        given = Columns.from_config(config)
        record, columns = clf.meta.get("splits", {}).get("test"), None if given == Columns() else given
        if is_label_file(config.data):
            dataset, which = eval_split(config.data, classes, record, columns, task=clf.task)
        else:
            dataset, which = hf_eval_split(config.data, classes, record, columns, task=clf.task)
        data_dir = Path(config.data)
        report.print(f"evaluating {which}")
    else:
        data_dir = Path(config.data)
        if find_split(data_dir, ("train",)) and find_split(data_dir, EVAL_SPLITS):
            data_dir = find_split(data_dir, EVAL_SPLITS)
        # The test part the run held out of a flat folder (or train/ alone), else the whole folder.
        dataset = recorded_part(data_dir, classes, clf.meta.get("splits", {}).get("test"))
        if dataset is not None:
            report.print(f"evaluating the {len(dataset.samples)} images held out of {data_dir} for testing, "
                         "as recorded in the checkpoint")
        else:
            dataset = image_folder(data_dir, classes)
        if clf.multilabel:  # class folders: each image has its folder's class, and no other
            dataset.samples = [(path, (target,)) for path, target in dataset.samples]
            dataset.targets = [target for _, target in dataset.samples]
    for name in missing_classes(classes, dataset):
        report.print(f"warning: class '{name}' has no images in {data_dir}")
    workers = num_workers(config.num_workers, on_gpu=accelerator.device.type == "cuda")
    loader = make_eval_loader(dataset, pre, batch_size=config.batch_size, num_workers=workers,
                              pin_memory=accelerator.device.type == "cuda")
    model = clf.prepare(accelerator)
    loader = accelerator.prepare_data_loader(loader)
    report.print(f"{len(dataset.samples)} images on {accelerator.device.type}, precision {clf.precision_name}")
    if clf.multilabel:
        return evaluate_multilabel_run(accelerator, model, loader, clf, dataset, data_dir, out_dir, report, config)
    preds = evaluate(accelerator, model, loader, len(classes), to_input=clf.to_input,
                     probabilities=clf.probabilities, keep_logits=True)
    metrics = {"checkpoint": str(clf.path), "data": str(data_dir),
               **summarise(classes, preds.targets, preds.topk),
               "calibration": {**calibration_figures(preds.logits, preds.targets, clf.calibration.temperature),
                               "fitted_on": clf.calibration.fitted_on, "applied": clf.temperature != 1.0}}
    if accelerator.is_main_process:
        # Files before printing: a reader that stops early (| head -1) must not cost them.
        atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=1))
        atomic_write_text(out_dir / "predictions.csv", predictions_csv(dataset, classes, preds))
        show(report, classes, metrics, config.plots)
        report.print(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'predictions.csv'}")
        if config.plots:
            write_pictures(accelerator, out_dir, dataset, classes, metrics, preds, pre)
            report.print(f"wrote {out_dir / 'confusion.png'}, {out_dir / 'mistakes.png'} and "
                         f"{out_dir / 'reliability.png'}")
    accelerator.log({"eval/accuracy": metrics["accuracy"]}, step=0)
    accelerator.end_training()
    return metrics


def evaluate_multilabel_run(accelerator: Any, model: Any, loader: Any, clf: Any, dataset: Any, data_dir: Path,
                            out_dir: Path, report: Any, config: EvalConfig) -> dict[str, Any]:
    """eval.py for a multi-label checkpoint: mAP, F1 and exact match at the checkpoint's thresholds,
    per-class figures, predictions.csv, and the pictures (per-class AP, the most confident false
    positives and false negatives)."""
    # loaded by main already: here only to keep the module's top torch-free
    from finetune.report.console import multilabel_table
    from finetune.report.metrics import summarise_multilabel
    from finetune.training.engine import evaluate_multilabel
    from finetune.utils.files import atomic_write_text

    classes = clf.classes
    preds = evaluate_multilabel(accelerator, model, loader, len(classes), to_input=clf.to_input)
    preds.thresholds = clf.thresholds
    metrics = {"checkpoint": str(clf.path), "data": str(data_dir),
               **summarise_multilabel(classes, preds.targets, preds.probabilities, clf.thresholds)}
    if accelerator.is_main_process:
        atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=1))
        atomic_write_text(out_dir / "predictions.csv", multilabel_predictions_csv(dataset, classes, preds))
        report.print(f"mAP {metrics['map']:.4f}, micro-F1 {metrics['micro_f1']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, "
                     f"exact match {metrics['exact_match']:.4f} on {metrics['num_samples']} images "
                     "(at the checkpoint's per-class thresholds)")
        report.print(multilabel_table(classes, metrics["per_class"]))
        report.print(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'predictions.csv'}")
        if config.plots:
            write_multilabel_pictures(accelerator, out_dir, dataset, classes, metrics, preds, clf.preprocessing)
            report.print(f"wrote {out_dir / 'average_precision.png'}, {out_dir / 'false_positives.png'} and "
                         f"{out_dir / 'false_negatives.png'}")
    accelerator.log({"eval/map": metrics["map"], "eval/micro_f1": metrics["micro_f1"]}, step=0)
    accelerator.end_training()
    return metrics


def write_multilabel_pictures(accelerator: Any, out_dir: Path, dataset: Any, classes: list[str],
                              metrics: dict[str, Any], preds: Any, pre: Any) -> None:
    """``average_precision.png``, ``false_positives.png`` and ``false_negatives.png`` (the labels given
    with the highest probability that the image lacks, and those missed with the lowest)."""
    # loaded by main already: here only to keep the module's top torch-free
    from finetune.report.plots import average_precision_png, false_decisions_png, save_png
    from finetune.report.tracking import log_png

    truth, predicted, probs = preds.targets > 0.5, preds.predicted, preds.probabilities
    preset = pre.eval_preset()
    pictures = {"average_precision": average_precision_png(classes, [metrics["per_class"][c]["ap"] for c in classes],
                                                           metrics["map"])}
    for name, kind, wrong, confidence in (("false_positives", "false positives", ~truth & predicted, probs),
                                          ("false_negatives", "false negatives", truth & ~predicted, 1 - probs)):
        where = wrong.nonzero()  # (image, class) pairs
        worst = where[confidence[wrong].argsort(descending=True, stable=True)][:MISTAKES_SHOWN].tolist()
        images = [preset(dataset.samples[int(preds.indices[i])][0]).permute(1, 2, 0).numpy() for i, _ in worst]
        pictures[name] = false_decisions_png(
            images, [";".join(classes[j] for j in truth[i].nonzero().flatten().tolist()) for i, _ in worst],
            [classes[c] for _, c in worst], [float(probs[i, c]) for i, c in worst], kind, len(where), len(truth))
    for name, png in pictures.items():
        save_png(out_dir / f"{name}.png", png)
        log_png(accelerator, f"eval/{name}", png, step=0)


def multilabel_predictions_csv(dataset: Any, classes: list[str], preds: Any) -> str:
    """Per image: its labels, the predicted ones, whether they are exactly right, and every class's probability."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "true", "predicted", "correct", *(f"p({c})" for c in classes)])
    truth, predicted = preds.targets > 0.5, preds.predicted
    for row, index in enumerate(preds.indices.tolist()):
        names = [";".join(classes[j] for j in part[row].nonzero().flatten().tolist()) for part in (truth, predicted)]
        writer.writerow([dataset.samples[index][0], *names, int(bool((truth[row] == predicted[row]).all())),
                         *(f"{p:.6f}" for p in preds.probabilities[row].tolist())])
    return buffer.getvalue()


def show(report: Any, classes: list[str], metrics: dict[str, Any], plots: bool = False) -> None:
    from finetune.report.console import confusion_table, per_class_table  # torch-free module, loaded by main

    line = f"accuracy {metrics['accuracy']:.4f} on {metrics['num_samples']} images"
    if "top5_accuracy" in metrics:
        line += f"; top-5 accuracy {metrics['top5_accuracy']:.4f}"
    report.print(line)
    report.print(calibration_line(metrics["calibration"]))
    per_class = metrics["per_class"]
    report.print(per_class_table(classes, [per_class[c]["precision"] for c in classes],
                                 [per_class[c]["recall"] for c in classes], [per_class[c]["support"] for c in classes]))
    table = confusion_table(classes, metrics["confusion_matrix"])
    if table is not None:
        report.print(table)
    else:
        report.print(f"confusion matrix: {len(classes)} classes are too many to print; it is in metrics.json"
                     + (" and confusion.png" if plots else ""))


def calibration_line(cal: dict[str, Any]) -> str:
    """What eval.py says about its probabilities: calibrated or not, and ECE and NLL before and after."""
    figures = (f"ECE {cal['ece_before']:.3f} -> {cal['ece_after']:.3f}, "
               f"NLL {cal['nll_before']:.3f} -> {cal['nll_after']:.3f} ({cal['bins']} bins)")
    if not cal["fitted_on"]:
        return (f"probabilities: uncalibrated softmax (the checkpoint records no temperature: train with "
                f"--val-fraction 0.1 or a val/ folder); ECE {cal['ece_before']:.3f}, NLL {cal['nll_before']:.3f}")
    if not cal["applied"]:
        return (f"probabilities: raw softmax (--no-calibration); with the recorded temperature "
                f"{cal['temperature']:.3f}: {figures}")
    return f"probabilities: calibrated, temperature {cal['temperature']:.3f} (fitted on {cal['fitted_on']}): {figures}"


def write_pictures(accelerator: Any, out_dir: Path, dataset: Any, classes: list[str], metrics: dict[str, Any],
                   preds: Any, pre: Any) -> None:
    """``confusion.png``, ``mistakes.png`` (the most confidently wrong images, as the model saw
    them) and ``reliability.png`` (accuracy against confidence, before and after calibration), also
    sent to TensorBoard's images tab where it is the tracker."""
    # loaded by main already: here only to keep the module's top torch-free
    from finetune.report.plots import confusion_png, mistakes_png, reliability_png, save_png
    from finetune.report.tracking import log_png

    wrong = (preds.topk[:, 0] != preds.targets).nonzero().flatten()
    worst = wrong[preds.confidence[wrong].argsort(descending=True, stable=True)][:MISTAKES_SHOWN].tolist()
    preset = pre.eval_preset()
    images = [preset(dataset.samples[int(preds.indices[i])][0]).permute(1, 2, 0).numpy() for i in worst]
    pictures = {
        "confusion": confusion_png(classes, metrics["confusion_matrix"]),
        "mistakes": mistakes_png(images, [classes[int(preds.targets[i])] for i in worst],
                                 [classes[int(preds.topk[i, 0])] for i in worst],
                                 [float(preds.confidence[i]) for i in worst], total_images=len(preds.targets),
                                 total_mistakes=len(wrong)),
        "reliability": reliability_png(*reliability_curves(metrics["calibration"])),
    }
    for name, png in pictures.items():
        save_png(out_dir / f"{name}.png", png)
        log_png(accelerator, f"eval/{name}", png, step=0)


def reliability_curves(cal: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The curves and title of reliability.png: the raw softmax, and the calibrated probabilities
    where the checkpoint records a temperature."""
    curves = {f"softmax (ECE {cal['ece_before']:.3f})": cal["reliability_before"]}
    if cal["fitted_on"]:
        curves[f"temperature {cal['temperature']:.2f} (ECE {cal['ece_after']:.3f})"] = cal["reliability_after"]
    return curves, f"reliability on {sum(cal['reliability_before']['count']):.0f} images"


def predictions_csv(dataset: Any, classes: list[str], preds: Any) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "true", "predicted", "confidence", "correct"])
    for index, target, top, conf in zip(preds.indices.tolist(), preds.targets.tolist(),
                                        preds.topk[:, 0].tolist(), preds.confidence.tolist()):
        writer.writerow([dataset.samples[index][0], classes[target], classes[top], f"{conf:.6f}", int(target == top)])
    return buffer.getvalue()


def run() -> None:
    """The ``finetune-eval`` console script."""
    leave(run_cli(main))
