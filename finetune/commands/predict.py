"""Classify new images with a checkpoint written by train.py.

    python predict.py --ckpt runs/NAME/model.safetensors photos/ more.jpg list.txt [--top-k 3]
    python predict.py --ckpt ... photos/ --output preds.csv        # or preds.jsonl

INPUT is image files, folders (searched recursively, no class structure needed) and .txt files
listing image paths. Results stream to the output as they come, so memory stays flat on any
number of images; under ``accelerate launch`` each image is predicted exactly once.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

from finetune.config import BAD_DATA_POLICIES, PRECISIONS, check_values, option, parse_config
from finetune.errors import UserError, leave, run_cli
from finetune.utils.allocator import keep_freed_memory

OUTPUT_FORMATS = (".csv", ".jsonl")


@dataclass
class PredictConfig:
    ckpt: str | None = option(None, "checkpoint written by train.py (model.safetensors)")
    inputs: tuple[str, ...] = option((), "image files, folders (searched recursively) and .txt files listing image "
                                         "paths", positional=True)
    top_k: int = option(1, "classes per image, best first (a multi-label checkpoint lists every class over its "
                           "threshold instead)", minimum=1)
    output: str | None = option(None, "write the predictions to this .csv or .jsonl file instead of printing a table")
    batch_size: int = option(64, "images per process per batch", minimum=1)
    bad_data: str = option("skip", "images that cannot be decoded: skip (and list them) or fail", choices=BAD_DATA_POLICIES)
    num_workers: int = option(-1, "data-loading workers per process (-1: matched to the CPU cores)")
    threads: int = option(-1, "CPU compute threads per process (-1: the cores shared among this machine's processes)")
    mixed_precision: str = option("auto", "auto: what the training's own test pass ran in (recorded in the "
                                          "checkpoint), as eval.py; or no, bf16, fp16", choices=PRECISIONS)
    channels_last: bool = option(True, "use the channels-last memory format")
    fold_batchnorm: bool = option(False, "fold BatchNorm into the convolutions: faster on CPUs, but an image at the "
                                         "decision boundary may then flip against eval.py")
    cpu: bool = option(False, "run on the CPU even where a GPU is visible")
    calibration: bool = option(True, "divide the logits by the temperature the checkpoint records (fitted on the "
                                     "run's validation split) before the softmax; --no-calibration: the raw softmax")
    abstain: bool = option(False, "mark an image 'unknown' when its top probability is below --min-confidence or "
                                  "its out-of-distribution score is above the checkpoint's threshold")
    min_confidence: float = option(0.5, "with --abstain: the top probability below which an image is 'unknown'",
                                   minimum=0, maximum=1)

    def __post_init__(self) -> None:
        self.inputs = tuple(self.inputs)
        check_values(self)


class _Listed:
    """The images to predict as the ``samples`` list that ``data.make_eval_loader`` reads, so predict.py
    decodes and batches exactly as eval.py does. Each image's "target" is its position in ``paths``:
    the loader keeps the target of an unreadable image (it blanks the image and sets its index to -1),
    so the position still names the image to list as skipped."""

    def __init__(self, paths: list[Path]):
        self.samples = [(str(path), position) for position, path in enumerate(paths)]

    def __len__(self) -> int:
        return len(self.samples)


class _Blank:
    """The loader's ``skipped`` under ``--bad-data skip``: blank an unreadable image, and record nothing,
    since predict.py names skipped images from the gathered flags (which cover every process's share)
    rather than from a queue that nothing would read."""

    def record(self, path: str, why: str) -> None:
        pass


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    # Flags first: --help and a bad flag answer at once, before torch (seconds to import) loads.
    config: PredictConfig = parse_config(argv, PredictConfig, description=__doc__.splitlines()[0])
    keep_freed_memory()  # this command's process, before it allocates tensors or forks workers
    # After the flags: --help and a bad flag answer before torch (seconds to import) loads.
    from finetune.data.inputs import image_paths
    from finetune.data.loader import make_eval_loader
    from finetune.models.inference import load_classifier
    from finetune.report.console import Reporter
    from finetune.utils.runtime import build_accelerator, num_workers

    if not config.ckpt or not config.inputs:
        raise UserError("predict.py needs --ckpt FILE and at least one INPUT (image, folder or .txt list)")
    out_path = Path(config.output) if config.output else None
    if out_path is not None and out_path.suffix.lower() not in OUTPUT_FORMATS:
        raise UserError(f"--output must end in .csv or .jsonl, got {out_path}")
    # The precision rule (models.inference): eval.py's, so that both give the same answers.
    clf = load_classifier(config.ckpt, mixed_precision=config.mixed_precision, channels_last=config.channels_last,
                          fold_batchnorm=config.fold_batchnorm, calibrated=config.calibration)
    paths = list(image_paths(config.inputs))
    if not paths:
        raise UserError(f"no images found in {', '.join(config.inputs)}")

    accelerator = build_accelerator(clf.precision, cpu_threads=config.threads, cpu=config.cpu)
    report = Reporter(enabled=accelerator.is_main_process)
    on_gpu = accelerator.device.type == "cuda"
    # eval.py's loader: its preset, worker rule and uint8 channels-last batches, normalised on the device.
    loader = make_eval_loader(_Listed(paths), clf.preprocessing, batch_size=config.batch_size,
                              num_workers=num_workers(config.num_workers, on_gpu=on_gpu), pin_memory=on_gpu,
                              skipped=None if config.bad_data == "fail" else _Blank())
    model = clf.prepare(accelerator)
    loader = accelerator.prepare_data_loader(loader)
    report.print(f"{len(paths)} image(s) on {accelerator.device.type}, precision {clf.precision_name}")
    for note in trust_notes(clf, config):
        report.print(note)
    k = len(clf.classes) if clf.multilabel else min(config.top_k, len(clf.classes))

    rows = _predict(accelerator, model, loader, clf, k, config.min_confidence)
    counts = {"predicted": 0, "skipped": 0, "unknown": 0}
    skipped: list[str] = []
    if accelerator.is_main_process:
        with _Sink(out_path, k, report, multilabel=clf.multilabel, abstain=config.abstain) as sink:
            for index, readable, classes, probs, score, unknown in rows:
                if readable:
                    unknown = bool(unknown) and config.abstain
                    if clf.multilabel:  # every class's probability: those over their thresholds
                        labels, probs = clf.labels_over_threshold(probs)
                    else:
                        labels = [clf.classes[c] for c in classes]
                    sink.write(str(paths[index]), labels, probs, score, unknown)
                    counts["predicted"] += 1
                    counts["unknown"] += unknown
                else:
                    skipped.append(str(paths[index]))
        for path in skipped:
            report.print(f"skipped unreadable image: {path}")
        counts["skipped"] = len(skipped)
        if not counts["predicted"]:
            raise UserError(f"none of the {len(skipped)} image(s) could be read (see above): nothing predicted")
        where = f"; wrote {out_path}" if out_path else ""
        unknown = f", {counts['unknown']} of them unknown" if config.abstain else ""
        report.print(f"predicted {counts['predicted']} image(s){unknown}, skipped {counts['skipped']}{where}")
    else:
        for _ in rows:  # the other processes take part in every gather
            pass
    accelerator.end_training()
    return {**counts, "skipped_paths": skipped, "output": out_path}


def trust_notes(clf: Any, config: PredictConfig) -> list[str]:
    """What the probabilities are, and what --abstain can go by."""
    cal = clf.calibration
    if not config.calibration:
        notes = ["probabilities: raw softmax (--no-calibration)"]
    elif cal.calibrated:
        notes = [f"probabilities: calibrated, temperature {clf.temperature:.3f} (fitted on {cal.fitted_on})"]
    else:
        notes = ["probabilities: uncalibrated softmax (the checkpoint records no temperature: train with "
                 "--val-fraction 0.1 or a val/ folder)"]
    if config.abstain and (cal.ood_threshold is None or clf.ood_bank is None):
        notes.append("warning: the checkpoint records no out-of-distribution threshold (it predates them): "
                     "--abstain goes by --min-confidence alone")
    return notes


def _predict(accelerator: Any, model: Any, loader: Any, clf: Any, k: int,
             min_confidence: float) -> Iterator[tuple[int, bool, list[int], list[float], float, bool]]:
    """(dataset index, readable, top-k classes, their probabilities, OOD score (NaN: none), unknown) of
    every image once, a batch at a time."""
    import torch  # loaded by main already: here only to keep the module's top torch-free

    from finetune.models.inference import forward_batches  # loaded by main already

    scored = clf.ood_bank is not None
    with clf.feature_tap() if scored else contextlib.nullcontext() as tap:
        for logits, (positions, indices) in forward_batches(model, loader, clf.to_input):
            readable = (indices >= 0).int()  # an int: gloo gathers no bools
            probs = clf.probabilities(logits)
            if clf.multilabel:  # every class, in class order; unknown on the OOD score alone
                top_p, top_i = probs, torch.arange(probs.shape[1], device=probs.device).expand_as(probs)
                confidence = torch.ones(len(probs))
            else:
                top_p, top_i = probs.topk(k, dim=1)
                confidence = top_p[:, 0]
            scores = clf.ood_scores(tap.features) if scored else None
            unknown = clf.unknown(confidence, scores, min_confidence).int().to(logits.device)
            scores = torch.full((len(logits),), float("nan")) if scores is None else scores
            scores = scores.to(logits.device)
            gathered = accelerator.gather_for_metrics((positions, readable, top_i, top_p, scores, unknown))
            order = gathered[0].argsort()  # gathered batches interleave the processes' shares
            yield from zip(*(part[order].tolist() for part in gathered))


class _Sink:
    """Where predictions go, one at a time: a CSV or JSON-lines file (written under a temporary name
    and renamed when complete), or rich tables on the terminal, one per batch of rows."""

    TABLE_ROWS = 64

    def __init__(self, path: Path | None, k: int, report: Any, multilabel: bool = False, abstain: bool = False):
        self.path, self.k, self.report, self.multilabel, self.abstain = path, k, report, multilabel, abstain
        self._stack = ExitStack()
        self._file: TextIO | None = None
        self._table: Any = None
        self._shown = 0

    def __enter__(self) -> "_Sink":
        if self.path is None:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            from finetune.utils.files import atomic_path  # loaded by main already

            tmp = self._stack.enter_context(atomic_path(self.path))  # renamed into place only when complete
            self._file = self._stack.enter_context(open(tmp, "w", encoding="utf-8", newline=""))
        except OSError as err:
            self._stack.close()
            raise UserError(f"cannot write {self.path}: {err.strerror or err}") from None
        if self.path.suffix.lower() == ".csv":
            self._csv = csv.writer(self._file)
            if self.multilabel:  # labels over their thresholds, joined by ';', and their probabilities likewise
                head = ["path", "labels", "probabilities"]
            else:
                head = ["path"] + [f"{what}_{i}" for i in range(1, self.k + 1) for what in ("class", "probability")]
            self._csv.writerow(head + ["ood_score"] + (["unknown"] if self.abstain else []))
        return self

    def write(self, path: str, classes: list[str], probs: list[float], score: float, unknown: bool) -> None:
        """One image's row; ``unknown`` is shown only under ``--abstain``."""
        if self._file is None:
            self._add_row(path, classes, probs, score, unknown)
        elif self.path.suffix.lower() == ".csv" and self.multilabel:
            self._csv.writerow([path, ";".join(classes), ";".join(f"{p:.6f}" for p in probs), _score(score)]
                               + ([int(unknown)] if self.abstain else []))
        elif self.path.suffix.lower() == ".csv":
            self._csv.writerow([path] + [v for c, p in zip(classes, probs) for v in (c, f"{p:.6f}")]
                               + [_score(score)] + ([int(unknown)] if self.abstain else []))
        else:
            row = {"path": path, "classes": classes, "probabilities": [round(p, 6) for p in probs],
                   "ood_score": None if math.isnan(score) else round(score, 4),
                   **({"unknown": unknown} if self.abstain else {})}
            self._file.write(json.dumps(row) + "\n")

    def _add_row(self, path: str, classes: list[str], probs: list[float], score: float, unknown: bool) -> None:
        from rich.table import Table

        if self._table is None:
            self._table = Table(show_header=self._shown == 0)
            self._table.add_column("path", overflow="fold")
            if self.multilabel:
                self._table.add_column("labels (probability)", overflow="fold")
            else:
                for i in range(1, self.k + 1):
                    self._table.add_column(f"class {i}" if self.k > 1 else "class")
                    self._table.add_column(f"p{i}" if self.k > 1 else "probability", justify="right")
            self._table.add_column("ood score", justify="right")
            if self.abstain:
                self._table.add_column("answer")
        if self.multilabel:
            shown = [", ".join(f"{c} ({p:.4f})" for c, p in zip(classes, probs)) or "none"]
        else:
            shown = [v for c, p in zip(classes, probs) for v in (c, f"{p:.4f}")]
        answer = "unknown" if unknown else (", ".join(classes) if self.multilabel else classes[0])
        self._table.add_row(path, *shown, _score(score), *((answer,) if self.abstain else ()))
        self._shown += 1
        if self._shown % self.TABLE_ROWS == 0:
            self._flush_table()

    def _flush_table(self) -> None:
        if self._table is not None and self._table.row_count:
            self.report.print(self._table)
        self._table = None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._flush_table()
        try:
            self._stack.__exit__(exc_type, exc, tb)
        except OSError as err:
            raise UserError(f"cannot save {self.path}: {err.strerror or err}") from None


def _score(score: float) -> str:
    """An OOD score as shown: empty where the checkpoint has none (it predates them)."""
    return "" if math.isnan(score) else f"{score:.4f}"


def run() -> None:
    """The ``finetune-predict`` console script."""
    leave(run_cli(main))
