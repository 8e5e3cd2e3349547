"""Draw docs/serve.png, the README's picture of serve.py's page: a quick model trained on six classes
of scikit-image photos, served, and three of its test photos dropped on the page in headless
Chromium (Debian's chromium and chromium-driver, as tests/test_serve.py uses).

    .venv/bin/python -m docs.serve_page
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from bench.common import quietly
from bench.datasets import photos
from finetune.commands import train

DOCS = Path(__file__).resolve().parent
WIDTH = 1000  # CSS pixels: three result cards a row
ROOT = DOCS.parent
SHOWN = {"chelsea": "cat.jpg", "rocket": "launch.jpg", "coffee": "cup.jpg"}  # a test photo of each, renamed


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def screenshot(url: str, files: list[Path], out: Path) -> None:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        # The viewport itself (a headless window's size includes its frame), then fitted to the page.
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": WIDTH, "height": 400, "deviceScaleFactor": 1, "mobile": False})
        driver.get(url)
        WebDriverWait(driver, 60).until(lambda d: "classes" in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "files").send_keys("\n".join(str(f) for f in files))
        WebDriverWait(driver, 60).until(lambda d: [c.get_attribute("data-state") for c in
                                                   d.find_elements(By.CSS_SELECTOR, ".card")] == ["done"] * len(files))
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": False})
        driver.save_screenshot(str(out))
    finally:
        driver.quit()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="serve-page-") as tmp:
        data = photos(Path(tmp) / "photos")
        run = Path(tmp) / "run"
        quietly(train.main, ["--data", str(data), "--epochs", "3", "--image-size", "96", "--output-dir", str(run),
                             "--log-with", "none", "--no-plots"])
        port = free_port()
        with open(Path(tmp) / "serve.log", "w") as log:  # the child keeps its own copy of the file
            server = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--ckpt", str(run), "--port", str(port)],
                                      stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise SystemExit(f"serve.py did not start:\n{(Path(tmp) / 'serve.log').read_text()}") from None
                    time.sleep(0.2)
            files = []
            for cls, name in SHOWN.items():
                files.append(Path(tmp) / name)
                shutil.copy(min((data / "test" / cls).glob("*.jpg")), files[-1])
            shot = Path(tmp) / "serve.png"
            screenshot(f"http://127.0.0.1:{port}/", files, shot)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
        with Image.open(shot) as img:
            img.convert("RGB").quantize(colors=128).save(DOCS / "serve.png", optimize=True)
    print(f"docs/serve.png: {(DOCS / 'serve.png').stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
