"""Audit a dataset before training on it: likely mislabeled images, duplicates, outliers.

    python audit.py --data DATA                    # pretrained MobileNetV2 embeddings
    python audit.py --data labels.csv --ckpt runs/NAME/model.safetensors   # a fine-tuned network's

Every image of every split is embedded once by a pretrained backbone (or a checkpoint's network),
then k-fold probes and confident learning rank the labels, small pixel thumbnails and a ratio test find
near-duplicates within and across splits (and file hashes exact copies), and a class-typicality score finds outliers.
Writes suspects.csv, duplicates.csv, outliers.csv, suspects.png and duplicates.png.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from finetune.config import BAD_DATA_POLICIES, LABEL_FILE_HELP, PRECISIONS, check_values, option, parse_config
from finetune.errors import leave, run_cli
from finetune.utils.allocator import keep_freed_memory

SHOWN = 16  # images in suspects.png; pairs in duplicates.png: half as many
TABLE_ROWS = 10


@dataclass
class AuditConfig:
    data: str | None = option(None, "dataset folder (train/, val/, test/ or one sub-folder per class) or label file "
                                  "to audit, every split of it; omitted: the built-in offline demo", path=True)
    image_column: str | None = option(None, LABEL_FILE_HELP["image_column"])
    label_column: str | None = option(None, LABEL_FILE_HELP["label_column"])
    label_sep: str | None = option(None, LABEL_FILE_HELP["label_sep"])
    label_columns: str | None = option(None, LABEL_FILE_HELP["label_columns"])
    split_column: str | None = option(None, LABEL_FILE_HELP["split_column"])
    test_fraction: float = option(0.2, "as train.py: the share held out as the test part where the data has none "
                                       "(duplicates across it are reported as across splits)", minimum=0)
    val_fraction: float = option(0.0, "as train.py: the share of each training class held out for validation",
                                 minimum=0)
    split_seed: int = option(0, "as train.py: which files --val-fraction and --test-fraction hold out", minimum=0)
    model: str = option("mobilenet_v2", "the pretrained backbone whose features embed the images (as train.py's "
                                        "--model)")
    weights: str = option("IMAGENET1K_V1", "its weights (as train.py's --weights)")
    image_size: int = option(224, "the crop the backbone sees (eval preprocessing: resize, center-crop)", minimum=1)
    ckpt: str | None = option(None, "embed with this checkpoint's fine-tuned network instead of --model (its "
                                    "preprocessing too); labels are still judged by k-fold probes", path=True)
    folds: int = option(5, "folds of the label probes (each image is judged by probes that never saw it)",
                        minimum=2)
    seed: int = option(0, "which images share a fold", minimum=0)
    # duplicates.NEAR_RATIO (a test keeps them equal): this module stays free of numpy and torch.
    near_ratio: float = option(0.4, "two images are near-duplicates when each is the other's nearest by their "
                                    "pixel thumbnails and their distance is at most this share of the distance to "
                                    "the next-nearest (see docs/trust.md)", above=0, maximum=1)
    output_dir: str | None = option(None, "where the CSV files and pictures go (default runs/audit-DATANAME)",
                                    path=True)
    batch_size: int = option(64, "images per process per batch", minimum=1)
    num_workers: int = option(-1, "data-loading workers per process (-1: matched to the CPU cores)", minimum=0,
                              auto=-1)
    threads: int = option(-1, "CPU compute threads per process (-1: the cores shared among this machine's processes)",
                          minimum=1, auto=-1)
    mixed_precision: str = option("auto", "auto (bf16 where the hardware runs it fast, else fp32; a checkpoint's "
                                          "own test-pass precision with --ckpt), no, bf16, fp16",
                                  choices=PRECISIONS, false_means="no")
    bad_data: str = option("fail", "images that cannot be decoded: fail, or skip (and list them)",
                           choices=BAD_DATA_POLICIES)
    cpu: bool = option(False, "run on the CPU even where a GPU is visible")
    plots: bool = option(True, "draw suspects.png and duplicates.png")

    def __post_init__(self) -> None:
        check_values(self)


def default_output_dir(data: Path) -> Path:
    """``runs/audit-DATANAME``, beside the training runs of the same data."""
    return Path("runs") / ("audit-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(os.path.abspath(data)).name))


def main(argv: Sequence[str] | None = None) -> Any:
    """``audit.py`` with these arguments: the ``Findings`` on the main process, None on the others."""
    # Flags first: --help and a bad flag answer at once, before torch (seconds to import) loads.
    config: AuditConfig = parse_config(argv, AuditConfig, description=__doc__.splitlines()[0])
    keep_freed_memory()  # this command's process, before it allocates tensors or forks workers
    # After the flags: --help and a bad flag answer before torch (seconds to import) loads.
    from finetune.audit.embed import checkpoint_backbone, embed, pretrained_backbone
    from finetune.audit.findings import examine
    from finetune.data.labelfiles import Columns
    from finetune.data.sources import load_splits
    from finetune.models.build import check_model_name
    from finetune.report.console import Reporter
    from finetune.training.run import dataset_folder, preflight
    from finetune.training.rundir import ensure_writable
    from finetune.utils.runtime import build_accelerator, num_workers

    if config.ckpt is None:
        check_model_name(config.model)
    backbone = checkpoint_backbone(config.ckpt, config.mixed_precision) if config.ckpt else None
    precision = backbone.precision if backbone else config.mixed_precision
    accelerator = build_accelerator(precision, cpu_threads=config.threads, cpu=config.cpu)
    report = Reporter(enabled=accelerator.is_main_process)
    data = dataset_folder(accelerator, config)
    out_dir = Path(config.output_dir) if config.output_dir else default_output_dir(data)
    if accelerator.is_main_process:
        ensure_writable(out_dir)
    columns = Columns.from_config(config)
    exclude, notes = preflight(accelerator, data, config.bad_data, columns)
    splits = load_splits(data, frozenset(exclude), test_fraction=config.test_fraction,
                         val_fraction=config.val_fraction, split_seed=config.split_seed, columns=columns)
    for note in splits.notes:
        report.print(note)
    for note in notes + splits.warnings:
        report.print(f"warning: {note}")
    if backbone is None:
        with accelerator.local_main_process_first():  # one process a node fetches the weights
            backbone = pretrained_backbone(config.model, config.weights, config.image_size)
    sizes = ", ".join(f"{len(part)} {name}" for name, part in
                      (("train", splits.train), ("val", splits.val), ("test", splits.test)) if part is not None)
    report.print(f"embedding {sizes} images of {data} with {backbone.name}; {accelerator.num_processes} "
                 f"process(es) on {accelerator.device.type}")
    on_gpu = accelerator.device.type == "cuda"
    embeddings = embed(accelerator, splits, backbone, batch_size=config.batch_size,
                       num_workers=num_workers(config.num_workers, on_gpu=on_gpu))
    findings = None
    if accelerator.is_main_process:  # seconds of work on the gathered embeddings: one process does it
        findings = examine(embeddings, folds=config.folds, seed=config.seed, near_ratio=config.near_ratio)
        write_files(out_dir, findings)
        show(report, findings)
        written = ["suspects.csv", "duplicates.csv", "outliers.csv"]
        if config.plots:
            write_pictures(out_dir, findings, backbone.preprocessing)
            written += ["suspects.png", "duplicates.png"]
        report.print(f"wrote {', '.join(written)} in {out_dir}")
    accelerator.end_training()
    return findings


def table_csv(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_files(out_dir: Path, findings: Any) -> None:
    """suspects.csv, duplicates.csv and outliers.csv, each written whole or not at all."""
    # loaded by main already: here only to keep the module's top torch-free
    from finetune.audit.findings import DUPLICATE_COLUMNS, OUTLIER_COLUMNS, SUSPECT_COLUMNS
    from finetune.utils.files import atomic_write_text

    atomic_write_text(out_dir / "suspects.csv", table_csv(SUSPECT_COLUMNS, findings.suspects()))
    atomic_write_text(out_dir / "duplicates.csv", table_csv(DUPLICATE_COLUMNS, findings.duplicate_rows()))
    atomic_write_text(out_dir / "outliers.csv", table_csv(OUTLIER_COLUMNS, findings.outliers()))


def show(report: Any, findings: Any) -> None:
    """The summary: counts per split, then the most suspicious labels."""
    from rich.table import Table

    emb = findings.embeddings
    names = [name for name in ("train", "val", "test") if name in emb.splits]
    suspects, pairs, outliers = findings.suspects(), findings.duplicate_rows(), findings.outliers()
    summary = Table(title=f"audit of {len(emb)} images, {len(emb.classes)} classes")
    summary.add_column("finding")
    for name in names:
        summary.add_column(name, justify="right")
    summary.add_column("across splits", justify="right")
    summary.add_column("total", justify="right")

    def count(rows: list[dict[str, Any]], key: str, name: str) -> str:
        return str(sum(row[key] == name for row in rows))

    summary.add_row("likely mislabeled", *[count(suspects, "split", n) for n in names], "", str(len(suspects)))
    for kind, label in (("exact", "exact copies"), ("near", "near-duplicates")):
        rows = [r for r in pairs if r["kind"] == kind]
        within = [r for r in rows if r["split_a"] == r["split_b"]]
        across = len(rows) - len(within)
        summary.add_row(label, *[count(within, "split_a", n) for n in names], str(across), str(len(rows)))
    summary.add_row("outliers", *[count(outliers, "split", n) for n in names], "", str(len(outliers)))
    report.print(summary)
    if suspects:
        top = Table(title=f"most likely mislabeled ({min(TABLE_ROWS, len(suspects))} of {len(suspects)})")
        for column, justify in (("path", "left"), ("split", "left"), ("given", "left"), ("suggested", "left"),
                                ("score", "right")):
            top.add_column(column, justify=justify, overflow="fold")
        for row in suspects[:TABLE_ROWS]:
            top.add_row(row["path"], row["split"], row["given"], row["suggested"], f"{row['score']:.3f}")
        report.print(top)
    leaks = sum(r["split_a"] != r["split_b"] for r in pairs)
    if leaks:
        report.print(f"warning: {leaks} image pair(s) appear in more than one split (duplicates.csv): a test "
                     "accuracy over them measures memory, not generalisation")


def write_pictures(out_dir: Path, findings: Any, pre: Any) -> None:
    """suspects.png (the most suspicious images, given and suggested label) and duplicates.png (the
    most alike pairs, across splits first), as the backbone saw them."""
    # loaded by main already: here only to keep the module's top torch-free
    from finetune.report.plots import duplicates_png, save_png, suspects_png

    preset = pre.eval_preset()

    def image(path: str) -> Any:
        return preset(path).permute(1, 2, 0).numpy()

    suspects = findings.suspects()[:SHOWN]
    save_png(out_dir / "suspects.png", suspects_png(
        [image(r["path"]) for r in suspects], [r["given"] for r in suspects], [r["suggested"] for r in suspects],
        [r["score"] for r in suspects], total=len(findings.suspects()),
        images_audited=len(findings.embeddings)))
    pairs = sorted(findings.duplicate_rows(), key=lambda r: r["split_a"] == r["split_b"])[:SHOWN // 2]
    save_png(out_dir / "duplicates.png", duplicates_png(
        [(image(r["path_a"]), image(r["path_b"])) for r in pairs],
        [(f"{r['split_a']}: {r['label_a']}", f"{r['split_b']}: {r['label_b']}") for r in pairs],
        [r["similarity"] if r["kind"] == "near" else None for r in pairs], total=len(findings.duplicates)))


def run() -> None:
    """The ``finetune-audit`` console script."""
    leave(run_cli(main))
