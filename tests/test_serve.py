"""serve.py: the API in-process (FastAPI's test client), its batching, its limits, and the real
server: slow and vanished clients, SIGTERM, and the page driven in headless Chromium."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from pathlib import Path

import pytest
import torch
from conftest import ROOT, free_port, write_checkpoint, write_image_folder, write_truncated_jpeg
from fastapi.testclient import TestClient
from PIL import Image

from finetune.commands.serving import Limits, create_app
from finetune.models.batching import Batcher
from finetune.models.checkpoint import load_checkpoint, save_checkpoint
from finetune.models.inference import load_classifier

CLASSES = ["cat", "dog", "hot dog", "owl"]


@pytest.fixture(scope="session")
def served_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint as train.py writes it: the offline ImageNet MobileNetV2 at 32 px with a new head
    drawn at random, so that images get distinct probabilities; made once per session, in seconds."""
    path = write_checkpoint(tmp_path_factory.mktemp("serve") / "model.safetensors", CLASSES, model="mobilenet_v2",
                            weights="IMAGENET1K_V1")
    state, meta = load_checkpoint(path)
    generator = torch.Generator().manual_seed(0)
    weight = f"{meta['head']}.weight"
    state[weight] = torch.randn(state[weight].shape, generator=generator)
    save_checkpoint(path, state, meta)
    return path


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = write_image_folder(tmp_path_factory.mktemp("images"), {"a": 2, "b": 2}, size=48, ext=".jpg")
    return sorted(root.rglob("*.jpg"))


@pytest.fixture(scope="session")
def clf(served_ckpt: Path):
    # The served classifier and the one the answers are compared with are the same object, in one precision.
    return load_classifier(served_ckpt)


@pytest.fixture(scope="session")
def clf_fp32(served_ckpt: Path):
    # What the server processes below run in (--mixed-precision no): their answers are compared with it.
    return load_classifier(served_ckpt, mixed_precision="no")


def client_for(clf, **kwargs) -> TestClient:
    return TestClient(create_app(clf, **kwargs), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(clf):
    with client_for(clf) as c:  # entering runs the lifespan: the batcher starts
        yield c


def expected(clf, paths: list[Path], k: int) -> list[tuple[list[str], list[float]]]:
    return [(p.classes, p.probabilities) for p in clf.predict([str(p) for p in paths], top_k=k)]


def answered(response) -> list[tuple[list[str], list[float]]]:
    assert response.status_code == 200, response.text
    return [(p["classes"], p["probabilities"]) for p in response.json()["predictions"]]


def assert_same(ours, reference) -> None:
    assert [classes for classes, _ in ours] == [classes for classes, _ in reference]
    assert len({tuple(classes) for classes, _ in reference}) > 1 or len(reference) == 1  # not one answer for all
    for (_, p), (_, q) in zip(ours, reference):
        assert p == pytest.approx(q, abs=1e-5)


def multipart(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def one_line_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and "\n" not in body["error"] and "Traceback" not in body["error"]
    return body["error"]


# --- the API ---------------------------------------------------------------------------------

def test_predict_one_and_several_files_as_the_classifier_does(client, clf, images):
    one = client.post("/predict", files=multipart(images[:1]))
    assert_same(answered(one), expected(clf, images[:1], 5))
    assert [p["name"] for p in one.json()["predictions"]] == [images[0].name]
    several = client.post("/predict?top_k=2", files=multipart(images))
    assert_same(answered(several), expected(clf, images, 2))
    assert [p["name"] for p in several.json()["predictions"]] == [p.name for p in images]
    assert all(len(classes) == 2 for classes, _ in answered(several))


def test_predict_base64_json(client, clf, images):
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in images[:2]]
    encoded[1] = "data:image/jpeg;base64," + encoded[1]  # as a browser's FileReader gives it
    response = client.post("/predict", json={"images": encoded, "top_k": 3})
    assert_same(answered(response), expected(clf, images[:2], 3))
    assert [p["name"] for p in response.json()["predictions"]] == ["images[0]", "images[1]"]


def test_info_and_health(client, clf, served_ckpt):
    info = client.get("/info").json()
    assert info["classes"] == CLASSES and info["checkpoint"] == served_ckpt.name
    assert info["model"]["arch"] == "mobilenet_v2"
    assert info["preprocessing"]["image_size"] == 32 and info["preprocessing"]["mean"] == list(clf.preprocessing.mean)
    assert info["serving"]["device"] == "cpu" and info["serving"]["precision"] == clf.precision
    assert client.get("/health").json() == {"status": "ok", "in_flight": 0}


def test_openapi_page_documents_both_request_forms(client):
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    assert "files" in body["multipart/form-data"]["schema"]["properties"]
    assert {"/info", "/health"} <= set(schema["paths"])
    page = client.get("/docs")
    assert page.status_code == 200 and "/openapi.json" in page.text


def test_the_page_loads_nothing_from_elsewhere(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'type="file"' in page.text and "fetch(`predict" in page.text
    assert "http://" not in page.text and "https://" not in page.text and "//cdn" not in page.text


# --- bad input: a 4xx with a one-line JSON error, never a 500 ---------------------------------

def test_bad_uploads_get_one_line_errors(client, images, tmp_path):
    truncated = write_truncated_jpeg(tmp_path / "cut.jpg").read_bytes()
    cases = [
        (("notes.txt", b"not an image at all", "text/plain"), 400, "notes.txt is not an image"),
        (("empty.png", b"", "image/png"), 400, "empty.png is empty"),
        (("cut.jpg", truncated, "image/jpeg"), 400, "cannot decode image cut.jpg"),
    ]
    for upload, status, says in cases:
        assert says in one_line_error(client.post("/predict", files=[("files", upload)]), status)
    # One bad file among good ones fails the request, naming it.
    mixed = multipart(images[:1]) + [("files", cases[0][0])]
    assert "notes.txt" in one_line_error(client.post("/predict", files=mixed), 400)


def test_malformed_requests_get_one_line_errors(client, images):
    jpeg = ("files", (images[0].name, images[0].read_bytes(), "image/jpeg"))
    assert "multipart/form-data" in one_line_error(client.post("/predict", content=b"x"), 415)
    assert "not valid base64" in one_line_error(client.post("/predict", json={"images": ["@@@"]}), 422)
    assert "images" in one_line_error(client.post("/predict", json={"images": []}), 422)
    assert "Invalid JSON" in one_line_error(client.post("/predict", content=b"{not json",
                                                  headers={"content-type": "application/json"}), 422)
    assert "top_k" in one_line_error(client.post("/predict?top_k=0", files=[jpeg]), 422)
    assert "no images" in one_line_error(client.post("/predict", data={"other": "1"}, files=[("x", ("a", b"1"))]), 422)
    text_field = client.post("/predict", data={"files": "text"}, files=[("x", ("a", b"1"))])
    assert "must hold files" in one_line_error(text_field, 422)
    assert one_line_error(client.get("/nowhere"), 404)


def test_too_large_bodies_and_too_many_images_are_refused(clf, images):
    with client_for(clf, limits=Limits(max_body_bytes=20_000, max_images=3)) as small:
        big = [("files", ("big.bin", b"\0" * 30_000, "image/png"))]
        assert "over the limit of 20000" in one_line_error(small.post("/predict", files=big), 413)

        def chunks():  # no Content-Length: counted as it arrives
            for _ in range(30):
                yield b"\0" * 1000

        streamed = small.post("/predict", content=chunks(), headers={"content-type": "application/json"})
        assert "over the limit of 20000" in one_line_error(streamed, 413)
        assert "Too many files" in one_line_error(small.post("/predict", files=multipart(images[:4])), 400)
        assert "4 images" in one_line_error(small.post("/predict", json={"images": ["AA=="] * 4}), 400)
        assert small.post("/predict", files=multipart(images[:3])).status_code == 200


def png_header_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels: a decompression bomb's shape,
    without its megabytes."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def test_decompression_bombs_are_refused_before_decoding(clf):
    with client_for(clf, limits=Limits(max_pixels=1_000_000)) as strict:
        over_ours = [("files", ("wide.png", png_header_claiming(2000, 1000), "image/png"))]
        assert "2000 x 1000 pixels, over the limit" in one_line_error(strict.post("/predict", files=over_ours), 413)
        # Over twice Pillow's own limit: Pillow refuses it on opening.
        bomb = [("files", ("bomb.png", png_header_claiming(30_000, 30_000), "image/png"))]
        assert "bomb.png has more pixels" in one_line_error(strict.post("/predict", files=bomb), 413)


# --- batching -------------------------------------------------------------------------------

def test_requests_arriving_together_run_as_one_batch_off_the_event_loop():
    sizes: list[int] = []
    threads: set[str] = set()

    def run(values: list[int]) -> list[int]:
        sizes.append(len(values))
        threads.add(threading.current_thread().name)
        return [v * 10 for v in values]

    async def scenario() -> list[list[int]]:
        batcher = Batcher(run, max_batch=4, max_wait=0.5)
        await batcher.start()
        try:
            together = await asyncio.gather(*(batcher.submit([i]) for i in range(3)))
            several = await batcher.submit(list(range(10)))  # over max_batch: split, in order
        finally:
            await batcher.stop()
        return [*together, several]

    results = asyncio.run(scenario())
    assert results == [[0], [10], [20], [v * 10 for v in range(10)]]
    assert sizes == [3, 4, 4, 2]
    assert threads and threading.main_thread().name not in threads


def test_a_vanished_request_is_dropped_and_a_model_error_reaches_every_request():
    ran: list[list[str]] = []

    def run(values: list[str]) -> list[str]:
        ran.append(values)
        if "bad" in values:
            raise ValueError("the model failed")
        return values

    async def scenario() -> tuple[list[str], str]:
        batcher = Batcher(run, max_batch=8, max_wait=0.2)
        await batcher.start()
        try:
            gone = asyncio.create_task(batcher.submit(["gone"]))
            await asyncio.sleep(0)  # let it queue its item
            gone.cancel()  # its client vanished while the batch was still collecting
            kept = await batcher.submit(["kept"])
            failed = await asyncio.gather(batcher.submit(["bad"]), batcher.submit(["other"]), return_exceptions=True)
        finally:
            await batcher.stop()
        return kept, [str(err) for err in failed]

    kept, failed = asyncio.run(scenario())
    assert kept == ["kept"] and ran[0] == ["kept"]
    assert failed == ["the model failed", "the model failed"]


def test_precision_is_the_classifiers_autocast(served_ckpt: Path):
    with load_classifier(served_ckpt, mixed_precision="bf16").autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with load_classifier(served_ckpt, mixed_precision="no").autocast():
        assert not torch.is_autocast_enabled("cpu")


# --- the real server (a process of its own) -------------------------------------------------

class Server:
    """serve.py in a process of its own on a free port of 127.0.0.1; its output goes to a file."""

    def __init__(self, ckpt: Path, log: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--ckpt", str(ckpt), "--port",
                                          str(self.port), "--mixed-precision", "no", *args],
                                         stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"serve.py exited {self.proc.returncode}:\n{self.log.read_text()}"
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.1)  # not listening yet: try again
        raise AssertionError(f"serve.py did not answer /health in {timeout} s:\n{self.log.read_text()}")

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as response:
            return json.loads(response.read())

    def wait_for(self, condition, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.log.read_text()}"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def multipart_body(path: Path, boundary: str = "b0undary") -> tuple[bytes, str]:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{path.name}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def start_request(port: int, path: Path) -> tuple[socket.socket, bytes]:
    """A /predict request whose headers and first half of body are sent; the rest is returned to send later."""
    body, kind = multipart_body(path)
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {kind}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    half = len(body) // 2
    sock.sendall(head + body[:half])
    return sock, body[half:]


def read_response(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def post_file(url: str, path: Path, timeout: float = 30) -> dict:
    body, kind = multipart_body(path)
    request = urllib.request.Request(f"{url}/predict", data=body, headers={"Content-Type": kind})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(served_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    running = Server(served_ckpt, tmp_path_factory.mktemp("server") / "serve.log", "--body-timeout", "4")
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def test_slow_and_vanished_clients_do_not_hold_the_others(server, images, clf_fp32):
    slow, _rest = start_request(server.port, images[0])  # never sends the rest of its body
    server.wait_for(lambda: server.get("/health")["in_flight"] >= 1, "the slow request to arrive")
    started = time.monotonic()
    answer = post_file(server.url, images[1])
    assert_same([(p["classes"], p["probabilities"]) for p in answer["predictions"]], expected(clf_fp32, images[1:2], 4))
    assert time.monotonic() - started < 4  # answered while the slow client still holds its request

    # A client that sends a whole request and goes at once: the server carries on.
    body, kind = multipart_body(images[2])
    with socket.create_connection(("127.0.0.1", server.port)) as gone:
        gone.sendall((f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}"
                      f"\r\n\r\n").encode() + body)
    assert post_file(server.url, images[3])["predictions"][0]["name"] == images[3].name

    status, error = read_response(slow)  # the slow one is cut off after --body-timeout
    assert status == 408 and "did not arrive within 4 s" in error["error"]
    server.wait_for(lambda: server.get("/health")["in_flight"] == 0, "no request in flight")


def test_sigterm_answers_the_requests_in_flight_and_exits_0(served_ckpt, images, clf_fp32, tmp_path):
    running = Server(served_ckpt, tmp_path / "serve.log")
    try:
        running.wait_ready()
        sock, rest = start_request(running.port, images[0])
        running.wait_for(lambda: running.get("/health")["in_flight"] == 1, "the request to arrive")
        running.proc.send_signal(signal.SIGTERM)

        def refusing() -> bool:
            try:
                socket.create_connection(("127.0.0.1", running.port), timeout=5).close()
                return False
            except ConnectionRefusedError:
                return True

        running.wait_for(refusing, "the server to stop accepting connections")
        assert running.proc.poll() is None  # still draining
        sock.sendall(rest)
        status, answer = read_response(sock)
        assert status == 200
        assert_same([(p["classes"], p["probabilities"]) for p in answer["predictions"]], expected(clf_fp32, images[:1], 4))
        assert running.proc.wait(timeout=60) == 0, running.log.read_text()
        assert "stopped: the requests in flight were answered" in running.log.read_text()
    finally:
        running.stop()


def test_a_busy_port_is_one_line_of_error(served_ckpt):
    from conftest import python_cmd, run_cmd

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        proc = run_cmd(python_cmd("serve.py", "--ckpt", str(served_ckpt), "--port", str(port)))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(f"error: cannot listen on 127.0.0.1:{port}")
    assert len(proc.stderr.strip().splitlines()) == 1


BROWSER = shutil.which("chromium") and shutil.which("chromedriver")


@pytest.mark.skipif(not BROWSER, reason="apt packages chromium and chromium-driver are not installed "
                                        "(scripts/test.sh installs them)")
def test_the_page_in_a_real_browser(server, images, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,560"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(server.url + "/")
        WebDriverWait(driver, 60).until(lambda d: "classes" in d.find_element(By.ID, "model").text)
        picked = images[:2]
        driver.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in picked))
        WebDriverWait(driver, 60).until(
            lambda d: [c.get_attribute("data-state") for c in d.find_elements(By.CSS_SELECTOR, ".card")] == ["done"] * 2)
        shown = {}
        for card in driver.find_elements(By.CSS_SELECTOR, ".card"):
            shown[card.get_attribute("data-name")] = [label.text for label in card.find_elements(By.CSS_SELECTOR, ".label")]
        screenshot = tmp_path / "serve-page.png"
        driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
    keep = os.environ.get("FINETUNE_TEST_ARTEFACTS")  # where CI collects pictures the tests take
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(keep) / screenshot.name)
    # The page shows, for each image, the classes the API gives, best first.
    assert shown == {p.name: post_file(server.url, p)["predictions"][0]["classes"] for p in picked}
    assert all(len(classes) == 4 for classes in shown.values())
    with Image.open(screenshot) as img:
        assert img.size[0] >= 900 and len(img.convert("RGB").getcolors(1 << 24)) > 50  # a page, not a blank
