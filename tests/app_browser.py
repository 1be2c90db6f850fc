"""``t2i-app`` driven in headless Chromium (Debian's ``chromium`` + ``chromium-driver``; Selenium is pointed at
them, it downloads nothing): start the app, fill the Generate tab, read the page back. Used by
``tests/test_app.py`` and, as a script, to take the docs' screenshot:

    python -m tests.app_browser --screenshot docs/app.png                  # outputs/demo's checkpoints if trained
    python -m tests.app_browser --screenshot docs/app.png --tiny           # the test's tiny checkpoints
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ROOT = Path(__file__).resolve().parents[1]


def have_chromium() -> bool:
    return CHROMIUM.exists() and CHROMEDRIVER.exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    """``python -m t2i.cli.app <overrides> port=<free>`` as a subprocess; ``url`` once it serves."""

    def __init__(self, overrides: list[str], folder: Path, timeout: float = 90):
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.log = folder / "app.log"
        args = [sys.executable, "-m", "t2i.cli.app", *overrides, f"port={self.port}", f"output={folder / 'out'}",
                f"hydra.run.dir={folder / 'run'}"]
        self.proc = subprocess.Popen(args, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, cwd=ROOT)
        self.url = f"http://127.0.0.1:{self.port}/"
        deadline = time.monotonic() + timeout
        while "t2i-app: serving" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"t2i-app did not start:\n{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def chromium(width: int = 1400, height: int = 1000):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              f"--window-size={width},{height}", "--lang=en-US"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)


class Page:
    """The Generate tab of an open page."""

    def __init__(self, driver, url: str, timeout: float = 30):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.d, self.By, self.timeout = driver, By, timeout
        driver.get(url)
        WebDriverWait(driver, timeout).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#t2i-generate"))

    def find(self, css: str):
        return self.d.find_element(self.By.CSS_SELECTOR, css)

    def fill(self, elem_id: str, value) -> None:
        """Type ``value`` into the field ``#elem_id`` (its textarea or input), replacing what was there."""
        from selenium.webdriver.common.keys import Keys

        box = self.find(f"#{elem_id} textarea, #{elem_id} input")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        if str(value):
            box.send_keys(str(value))
        box.send_keys(Keys.TAB)  # the field commits its value on blur

    def value(self, elem_id: str) -> str:
        return self.find(f"#{elem_id} textarea, #{elem_id} input").get_attribute("value")

    def status(self) -> str:
        return self.find("#t2i-status").text.strip()

    def generate(self, **fields) -> str:
        """Fill ``fields`` (``{elem id without t2i-: value}``), click Generate, wait for a new status line."""
        from selenium.webdriver.support.ui import WebDriverWait

        for k, v in fields.items():
            self.fill(f"t2i-{k.replace('_', '-')}", v)
        before = self.status()
        self.find("#t2i-generate").click()
        WebDriverWait(self.d, self.timeout, poll_frequency=0.1).until(
            lambda d: self.status() and self.status() != before)
        return self.status()

    def gallery(self) -> list[tuple[str, str]]:
        """(image URL, caption) of every gallery item, in order."""
        items = self.d.execute_script("""
            return Array.from(document.querySelectorAll('#t2i-gallery .thumbnail-item, #t2i-gallery button'))
              .filter(b => b.querySelector('img'))
              .map(b => [b.querySelector('img').src, (b.querySelector('.caption-label') || b).innerText.trim()]);""")
        return [tuple(i) for i in items]

    def table(self) -> list[dict]:
        """The results table's rows as ``{score, clip, caption, seed, prompt, sample}``."""
        return self.d.execute_script("""
            return Array.from(document.querySelectorAll('#t2i-results tbody tr')).map(r => ({
              prompt: +r.dataset.prompt, sample: +r.dataset.sample,
              score: r.querySelector('.score').innerText, clip: r.querySelector('.clip').innerText,
              caption: r.querySelector('.caption').innerText, seed: r.querySelector('.seed').innerText}));""")

    def download_url(self) -> str | None:
        links = self.d.find_elements(self.By.CSS_SELECTOR, "#t2i-download a[href]")
        return links[0].get_attribute("href") if links else None


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


def fetch_image(url: str):
    from PIL import Image

    return Image.open(io.BytesIO(fetch(url))).convert("RGB")


# -- the docs' screenshot -------------------------------------------------------------------------------------
def demo_checkpoints(demo: Path) -> list[str] | None:
    if (demo / "transformer" / "metrics.json").exists():
        return [f"demo={demo}"]
    return None


def screenshot(out: Path, tiny: bool = False, demo: Path = ROOT / "outputs" / "demo") -> str:
    """Start the app (the demo's checkpoints unless ``tiny`` or not trained), generate once, save a PNG."""
    from tests.tiny_pipeline import captions, text_tokenizer, write_checkpoints

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        overrides = None if tiny else demo_checkpoints(demo)
        which = "demo" if overrides else "tiny"
        if overrides is None:
            paths = write_checkpoints(text_tokenizer(), tmp / "ckpt")
            overrides = [f"ckpt={paths['transformer']}", f"rerank.ckpt={paths['clip']}"]
        prompts = captions(2, "test") if which == "tiny" else ["一个大的红色圆形在左上角", "右下角有一个小的蓝色正方形"]
        app = App([*overrides, "device=cpu", "num_samples=4", "top_k=4"], tmp)
        driver = chromium(1400, 1000)
        try:
            page = Page(driver, app.url, timeout=300)
            page.generate(prompts="\n".join(prompts))
            driver.execute_script("window.scrollTo(0, 0)")
            time.sleep(1)  # the images finish loading
            out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(out))
        finally:
            driver.quit()
            app.close()
    return which


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--screenshot", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny checkpoints even when the demo has run")
    ap.add_argument("--demo", type=Path, default=ROOT / "outputs" / "demo", help="the t2i-demo output folder")
    a = ap.parse_args(argv)
    which = screenshot(a.screenshot, a.tiny, a.demo)
    print(json.dumps({"screenshot": str(a.screenshot), "checkpoints": which}))


if __name__ == "__main__":
    main()
