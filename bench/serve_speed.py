"""serve.py's throughput and latency under 1, 8 and 32 concurrent clients, against predict.py on the
same images in the same run.

    .venv/bin/python -m bench.serve_speed [--images 256] [--seconds 10] [--clients 1 8 32]
                                          [--repeats 3] [--model mobilenet_v2] [--image-size 224] [--out bench/out/serve_speed.json]

Writes a folder of photo-sized JPEGs (about 500x375, crops of scikit-image photos) and a checkpoint
(random weights: speed does not depend on them; no recorded precision, so both sides run in what
``auto`` picks for this machine). Then:

- serve.py starts on a free port of 127.0.0.1 (access log off) and stays up. Each of ``--repeats``
  rounds then runs predict.py in-process (the server idle) on the whole folder and on a list of its
  first half, then each client count for ``--seconds``: that many threads post one image per
  request (multipart, keep-alive connections, bodies built beforehand), cycling through the same
  images.
- predict.py's images/s as a user sees it (the whole run), and in its steady state (the second
  half's images over the time they added: start-up cancels out); per client count, images/s,
  p50 and p99 latency, the images per model batch and the share of the time the model ran, from
  the server's /info. Each side's best round counts, so that a busy moment of a shared machine
  hits neither alone.

Ratio: serve.py's images/s over predict.py's, the higher of its whole-run and steady-state rates
(target at 32 clients: >= 0.8).
Clients, server and predict.py share this machine's cores, as they would on one machine.
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch

from bench.common import quietly, write_json
from bench.datasets import photo_folder
from finetune.commands import predict as predict_cmd
from finetune.config import TrainConfig
from finetune.models.build import build_classifier, describe_checkpoint
from finetune.models.checkpoint import save_checkpoint
from finetune.utils.runtime import eval_precision, resolve_precision

ROOT = Path(__file__).resolve().parents[1]
BOUNDARY = "serve-speed-boundary"


def write_checkpoint(path: Path, classes: list[str], model: str, size: int) -> Path:
    torch.manual_seed(0)
    clf = build_classifier(model, "none", classes, image_size=size)
    config = TrainConfig(model=model, weights="none", image_size=size)
    save_checkpoint(path, clf.net.state_dict(), describe_checkpoint(config, clf, classes, {}))
    return path


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def predict_round(ckpt: Path, paths: list[Path], out: Path, round_: int) -> dict[str, float]:
    """One round of predict.py on all the images and on the first half (a .txt list): seconds of each."""
    lists = {"full": paths, "half": paths[:len(paths) // 2]}
    seconds = {}
    for side in (("full", "half") if round_ % 2 == 0 else ("half", "full")):
        listing = out / f"{side}.txt"
        listing.write_text("".join(f"{p}\n" for p in lists[side]))
        argv = ["--ckpt", str(ckpt), str(listing), "--output", str(out / "preds.csv")]
        seconds[side] = timed(functools.partial(quietly, predict_cmd.main, argv))
    return seconds


def predict_speed(rounds: list[dict[str, float]], n_images: int) -> dict[str, Any]:
    """predict.py's images/s from its best round of each list: over the whole run, and steady."""
    full_s, half_s = min(r["full"] for r in rounds), min(r["half"] for r in rounds)
    added = n_images - n_images // 2
    whole, steady = n_images / full_s, added / max(full_s - half_s, 1e-9)
    # The ratio's denominator: the higher of the two, the comparison least kind to serve.py (on a
    # shared machine the difference of two runs can come out below the whole run's rate).
    return {"seconds": rounds, "whole_run_img_per_s": whole, "steady_img_per_s": steady,
            "img_per_s": max(whole, steady)}


def multipart(path: Path) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{path.name}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{BOUNDARY}--\r\n".encode()


def load(port: int, bodies: list[bytes], clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` threads posting one image per request for ``seconds``: images/s and latencies."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}

    def client(offset: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        mine: list[float] = []
        i = offset
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            conn.request("POST", "/predict", body=bodies[i % len(bodies)], headers=headers)
            response = conn.getresponse()
            payload = response.read()
            if response.status != 200:
                with lock:
                    errors.append(f"{response.status} {payload[:200]!r}")
                break
            mine.append(time.perf_counter() - start)
            i += clients
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"serve.py answered {errors[0]}")
    ms = sorted(x * 1000 for x in latencies)
    cuts = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else ms * 99
    return {"clients": clients, "requests": len(ms), "seconds": elapsed, "img_per_s": len(ms) / elapsed,
            "p50_ms": cuts[49], "p99_ms": cuts[98]}


def get(port: int, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        return json.loads(response.read())


def start_server(ckpt: Path, log: Path) -> tuple[subprocess.Popen, int]:
    """serve.py on a port the OS picks, read from its first line; waits until /health answers."""
    with open(log, "w") as err:  # the child keeps its own copy of the file
        proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--ckpt", str(ckpt), "--port", "0",
                                 "--no-access-log"], stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    first = proc.stdout.readline()  # "serving ... on http://127.0.0.1:PORT/ ..." or EOF if it failed
    if "http://127.0.0.1:" not in first:
        proc.wait()
        raise RuntimeError(f"serve.py did not start:\n{first}{log.read_text()}")
    port = int(first.split("http://127.0.0.1:")[1].split("/")[0])
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its pipe drained
    deadline = time.monotonic() + 120
    while True:
        try:
            get(port, "/health")
            return proc, port
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"serve.py did not answer /health:\n{log.read_text()}") from None
            time.sleep(0.1)


def run(n_images: int, seconds: float, clients: list[int], model: str, size: int, repeats: int) -> dict[str, Any]:
    on_cpu = not torch.accelerator.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        root = photo_folder(tmp_path / "data", 4, n_images)
        classes = sorted(p.name for p in (root / "train").iterdir())
        paths = sorted((root / "test").rglob("*.jpg"))
        ckpt = write_checkpoint(tmp_path / "model.safetensors", classes, model, size)
        precision = resolve_precision(eval_precision("auto", {}), on_cpu)
        bodies = [multipart(p) for p in paths]
        proc, port = start_server(ckpt, tmp_path / "serve.log")
        rounds: list[dict[str, float]] = []
        runs: dict[int, list[dict[str, Any]]] = {c: [] for c in clients}
        try:
            load(port, bodies, max(clients), min(2.0, seconds))  # warm-up: first batches allocate
            for round_ in range(repeats):  # predict.py (the server idle), then each client count, in turn
                rounds.append(predict_round(ckpt, paths, tmp_path, round_))
                for c in clients:
                    before = get(port, "/info")["serving"]
                    level = load(port, bodies, c, seconds)
                    after = get(port, "/info")["serving"]
                    batches = after["batches"] - before["batches"]
                    level["images_per_batch"] = (after["images"] - before["images"]) / max(1, batches)
                    level["model_busy"] = (after["model_seconds"] - before["model_seconds"]) / level["seconds"]
                    runs[c].append(level)
            served = get(port, "/info")["serving"]
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    predict = predict_speed(rounds, len(paths))
    levels = []
    for c in clients:  # each client count's best round, as predict.py's
        level = max(runs[c], key=lambda r: r["img_per_s"])
        levels.append({**level, "serve_over_predict": level["img_per_s"] / predict["img_per_s"],
                       "rounds_img_per_s": [r["img_per_s"] for r in runs[c]]})
    top = levels[-1]
    return {"images": n_images, "model": model, "image_size": size, "precision": precision,
            "device": served["device"], "predict": predict, "levels": levels,
            "serve_over_predict": top["serve_over_predict"], "clients_at_ratio": top["clients"],
            "torch": torch.__version__, "cores": len(os.sched_getaffinity(0))}


def print_table(res: dict[str, Any]) -> None:
    p = res["predict"]
    print(f"\n{res['images']} JPEGs (500x375), {res['model']} at {res['image_size']} px, {res['device']}, "
          f"precision {res['precision']}, {res['cores']} cores")
    print(f"predict.py  {p['img_per_s']:8.1f} img/s (whole run {p['whole_run_img_per_s']:.1f}, steady state "
          f"{p['steady_img_per_s']:.1f}: the higher counts)")
    print(f"{'clients':>8} {'img/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'img/batch':>9} {'model busy':>10} {'vs predict':>10}")
    for level in res["levels"]:
        print(f"{level['clients']:>8} {level['img_per_s']:>8.1f} {level['p50_ms']:>8.1f} {level['p99_ms']:>8.1f} "
              f"{level['images_per_batch']:>9.1f} {level['model_busy']:>10.0%} {level['serve_over_predict']:>9.2f}x")
    print(f"serve.py at {res['clients_at_ratio']} clients / predict.py: {res['serve_over_predict']:.2f}x (target >= 0.8)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="distinct images (predict.py runs on all of them)")
    parser.add_argument("--seconds", type=float, default=10.0, help="load time per client count")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients, in turn")
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of predict.py and each client count")
    parser.add_argument("--out", type=Path, default=Path("bench/out/serve_speed.json"))
    args = parser.parse_args()
    res = run(args.images, args.seconds, args.clients, args.model, args.image_size, args.repeats)
    print_table(res)
    write_json(args.out, res)


if __name__ == "__main__":
    main()
