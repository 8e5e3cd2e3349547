"""Serve a checkpoint written by train.py over HTTP: an API and a page to drop images on.

    python serve.py --ckpt runs/NAME [--port 8000] [--host 127.0.0.1]

Open http://127.0.0.1:8000/ to classify images by hand; programs POST them to /predict
(multipart field ``files``, or JSON with base64 images); /docs documents the API. Requests
arriving together run as one batch, on the GPU when there is one, in the precision predict.py
uses. It listens on 127.0.0.1 only unless --host says otherwise; SIGTERM (or Ctrl-C) finishes the
requests in flight, then stops. To scale out, run one process per GPU behind a load balancer.
"""

from __future__ import annotations

import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any, Sequence

from finetune.config import PRECISIONS, check_values, option, parse_config
from finetune.errors import UserError, leave, run_cli

SWITCH_INTERVAL = 0.0005  # seconds; see main


@dataclass
class ServeConfig:
    ckpt: str | None = option(None, "checkpoint written by train.py (model.safetensors), or its run folder")
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0: every interface, reachable from other machines)")
    port: int = option(8000, "TCP port (0: any free one)", minimum=0, maximum=65535)
    top_k: int = option(5, "classes per image when a request does not say", minimum=1)
    max_batch: int = option(32, "the most images the model runs at once", minimum=1)
    max_wait_ms: float = option(5.0, "how long a batch waits for more images after its first arrived", minimum=0)
    max_body_mb: float = option(32.0, "the largest request body, in MiB", above=0)
    max_images: int = option(64, "the most images in one request", minimum=1)
    max_megapixels: float = option(64.0, "the most pixels in one image, in millions (larger ones are refused "
                                         "from their header, before decoding)", above=0)
    body_timeout: float = option(30.0, "seconds a request body may take to arrive", above=0)
    drain_timeout: float = option(30.0, "on SIGTERM, seconds to finish the requests in flight", above=0)
    mixed_precision: str = option("auto", "auto: what the training's own test pass ran in (recorded in the "
                                          "checkpoint), as predict.py; or no, bf16, fp16", choices=PRECISIONS)
    channels_last: bool = option(True, "use the channels-last memory format")
    threads: int = option(-1, "CPU compute threads (-1: the cores shared among this machine's processes)")
    cpu: bool = option(False, "run on the CPU even where a GPU is visible")
    access_log: bool = option(True, "log each request")

    def __post_init__(self) -> None:
        check_values(self)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    # Flags first: --help and a bad flag answer at once, before torch (seconds to import) loads.
    config: ServeConfig = parse_config(argv, ServeConfig, description=__doc__.splitlines()[0])
    import warnings

    import torch
    import uvicorn
    from PIL import Image

    # After the flags: torch, FastAPI and the model load here.
    from finetune.commands.serving import Limits, create_app, meta_line
    from finetune.models.inference import load_classifier
    from finetune.utils.runtime import check_gpus_usable, cores_per_process, cpu_forced, set_cpu_threads

    if not config.ckpt:
        raise UserError("serve.py needs --ckpt FILE (a checkpoint written by train.py, or its run folder)")
    force_cpu = cpu_forced(config.cpu)
    check_gpus_usable(force_cpu)
    on_cpu = force_cpu or not torch.accelerator.is_available()
    device = torch.device("cpu") if on_cpu else torch.accelerator.current_accelerator()
    # The precision rule (models.inference): predict.py's, so that both give the same answers.
    clf = load_classifier(config.ckpt, device=device, mixed_precision=config.mixed_precision,
                          channels_last=config.channels_last)
    if on_cpu:
        set_cpu_threads(config.threads)
    else:
        # TF32 as predict.py (configure_device); cuDNN autotuning stays off: batch sizes vary here,
        # and each new size would stall a request while cuDNN times its algorithms.
        torch.set_float32_matmul_precision("high")

    # The model's thread takes the GIL back between torch's operators; under load the event loop
    # (parsing requests) would hold it for Python's default 5 ms switch interval each time, which
    # doubled a MobileNetV2 batch's time. The server process does nothing else: switch faster.
    sys.setswitchinterval(SWITCH_INTERVAL)
    max_pixels = int(config.max_megapixels * 1e6)
    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow refuses larger images itself, wherever it opens one
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused with a 413 before that
    limits = Limits(max_body_bytes=int(config.max_body_mb * 2**20), body_seconds=config.body_timeout,
                    max_images=config.max_images, max_pixels=max_pixels, decode_threads=cores_per_process())
    app = create_app(clf, top_k=config.top_k, max_batch=config.max_batch,
                     max_wait_ms=config.max_wait_ms, limits=limits)
    sock = _listen(config.host, config.port)
    host, port = sock.getsockname()[:2]
    where = f"[{host}]" if ":" in host else host
    print(f"serving {clf.path} ({meta_line(clf)}; {device}, {clf.precision_name}) "
          f"on http://{where}:{port}/  (API: /docs; stop: Ctrl-C or SIGTERM)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", access_log=config.access_log,
                                           timeout_graceful_shutdown=config.drain_timeout))
    # uvicorn drains the requests in flight on SIGTERM, then raises the signal again for the
    # handler it found; with the default one the process would die by the signal (status 143)
    # after a clean shutdown. Ours lets main return: a drained stop is a success (status 0).
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    print("stopped: the requests in flight were answered", flush=True)
    return {"host": host, "port": port}


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``: bound here, so that a busy port is one line of error."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def run() -> None:
    """The ``finetune-serve`` console script."""
    leave(run_cli(main))
