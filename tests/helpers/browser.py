"""Debian's Chromium driven by Selenium, whose fake microphone "hears" a real recording, and `lyra serve`
started in a subprocess on a free loopback port. Used by tests/test_serve_page.py and
scripts/screenshot_page.py; never a downloaded browser."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

REPO = Path(__file__).resolve().parents[2]
CHROMEDRIVER = "/usr/bin/chromedriver"  # Debian's chromium-driver, the same version as its chromium
WINDOW = (960, 820)
SERVER_START_S = 120.0  # a first run may build the tiny checkpoint
MIC_RATE_HZ = 16_000


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def chromium_missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    if importlib.util.find_spec("selenium") is None:
        return "needs the `selenium` package (pip install 'lyra-cli[test]')"
    if chromium() is None or not Path(CHROMEDRIVER).exists():
        return "needs Debian's Chromium and its driver (apt-get install chromium chromium-driver)"
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        return "needs the server's packages (pip install 'lyra-cli[serve]')"
    return None


needs_chromium = pytest.mark.skipif(chromium_missing() is not None, reason=str(chromium_missing()))


def mic_recording(source: Path, target: Path) -> Path:
    """`source` decoded to the 16-bit mono wav Chromium's fake microphone plays (it loops the file)."""
    import soundfile

    from lyra_cli.audio.io import SAMPLE_RATE_HZ, load_audio

    soundfile.write(target, load_audio(source), SAMPLE_RATE_HZ, subtype="PCM_16")
    return target


def start_browser(mic_wav: Path, *, allow_mic: bool = True) -> WebDriver:
    """Headless Chromium whose microphone plays `mic_wav`; the page may play sound without a gesture.
    `allow_mic` False: every request for the microphone is refused, as when a user denies it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium() or ""
    flags = ["--headless=new", "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={mic_wav}",
             "--autoplay-policy=no-user-gesture-required", f"--window-size={WINDOW[0]},{WINDOW[1]}",
             "--use-fake-ui-for-media-stream" if allow_mic else "--deny-permission-prompts"]  # fmt: skip
    if os.geteuid() == 0:  # Chromium's sandbox refuses to run as root (containers, CI)
        flags.append("--no-sandbox")
    for flag in flags:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def lyra_serve(model: str | Path, *extra: str, log: Path | None = None) -> Iterator[str]:
    """`lyra serve --model MODEL` on a free loopback port until the block ends; yields its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "lyra_cli.main", "serve", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log or os.devnull, "wb") as sink:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_healthy(url, proc, log)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def wait_until_healthy(url: str, proc: subprocess.Popen, log: Path | None = None) -> None:
    output = f"; its output is in {log}" if log else ""
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`lyra serve` exited with {proc.returncode} before answering /health{output}")
        with (
            contextlib.suppress(OSError),  # refused, or accepted but not answered while the model loads
            urllib.request.urlopen(f"{url}/health", timeout=1) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"`lyra serve` did not answer {url}/health within {SERVER_START_S:.0f} s{output}")


# -- the page ----------------------------------------------------------------------------------------

ANSWER_S = 60.0  # generous: the tiny model answers in about a second; CI machines are slower and shared


def element(driver: WebDriver, element_id: str) -> object:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def page_state(driver: WebDriver) -> str:
    return str(element(driver, "app").get_attribute("data-state"))


def wait_for(driver: WebDriver, condition, timeout_s: float = ANSWER_S) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout_s, poll_frequency=0.05).until(lambda d: condition(d))


def record(driver: WebDriver, seconds: float) -> None:
    """Record `seconds` from the (fake) microphone with the page's Record button, as a user does."""
    element(driver, "record").click()
    wait_for(driver, lambda d: page_state(d) == "recording", 10)
    time.sleep(seconds)
    element(driver, "record").click()
    wait_for(driver, lambda d: "Recording" in element(d, "attachments").text, 10)


def set_max_tokens(driver: WebDriver, max_tokens: int | None) -> None:
    driver.execute_script("document.getElementById('max-tokens').value = arguments[0]", str(max_tokens or ""))


def ask(driver: WebDriver, *, image: Path | None = None, record_s: float = 0.0, text: str = "") -> None:
    """Attach `image`, record `record_s` seconds, type `text` (each when given) and press Send."""
    if image is not None:
        element(driver, "image").send_keys(str(image))
        wait_for(driver, lambda d: "Image" in element(d, "attachments").text, 10)
    if record_s:
        record(driver, record_s)
    if text:
        element(driver, "text").send_keys(text)
    element(driver, "send").click()


def wait_answered(driver: WebDriver) -> str:
    """The page's state once the answer ended (`done`) or failed (`error`)."""
    wait_for(driver, lambda d: page_state(d) in ("done", "error"))
    return page_state(driver)
