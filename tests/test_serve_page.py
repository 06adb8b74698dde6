"""`lyra serve`'s web page in a real browser: Debian's headless Chromium, whose fake microphone plays a real
recording, asks a spoken question about a real image; the answer's text and speech stream in."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers.browser import (
    MIC_RATE_HZ,
    ask,
    element,
    lyra_serve,
    mic_recording,
    needs_chromium,
    page_state,
    record,
    set_max_tokens,
    start_browser,
    wait_answered,
    wait_for,
)

PAGE = Path(__file__).resolve().parent.parent / "lyra_cli" / "serve" / "static" / "index.html"
API_KEY = "page-test-key"
RECORD_S = 2.0
SHORT_ANSWER_TOKENS = 24  # enough for several audio chunks from the tiny model, quick to generate
MS = re.compile(r"^\d+ ms$")


@pytest.fixture(scope="module")
def mic_wav(real: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mic_recording(real / "extreme_ironing.mp3", tmp_path_factory.mktemp("mic") / "question.wav")


@pytest.fixture(scope="module")
def server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with lyra_serve(tiny_dir, "--api-key", API_KEY, log=log) as url:
        yield url


@pytest.fixture(scope="module")
def browser(mic_wav: Path) -> Iterator[object]:
    driver = start_browser(mic_wav)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser, server: str) -> object:
    """The page freshly loaded (a new conversation), with the server's key already entered."""
    browser.get(server + "/")
    _js(browser, "localStorage.setItem('lyra.apiKey', arguments[0])", API_KEY)
    browser.refresh()
    wait_for(browser, _connected, 20)
    return browser


def _connected(driver) -> bool:
    return element(driver, "model").text not in ("connecting…", "not connected")


def _js(driver, script: str, *args: object) -> object:
    return driver.execute_script(script, *args)


@needs_chromium
def test_the_key_is_asked_for_then_kept(browser, server: str) -> None:
    from selenium.webdriver.common.keys import Keys

    browser.get(server + "/")
    _js(browser, "localStorage.clear()")
    browser.refresh()
    # no key yet: the server's 401 is shown as it said it, in plain words
    wait_for(browser, lambda d: element(d, "model").text == "not connected", 20)
    assert page_state(browser) == "error"
    assert element(browser, "error").text.startswith("The server answered 401")
    element(browser, "settings-toggle").click()
    element(browser, "api-key").send_keys(API_KEY + Keys.TAB)
    wait_for(browser, _connected, 20)
    assert _js(browser, "return localStorage.getItem('lyra.apiKey')") == API_KEY
    browser.refresh()  # kept across visits
    assert element(browser, "api-key").get_attribute("value") == API_KEY
    wait_for(browser, _connected, 20)


def _check_recording(sent: bytes, mic_wav: Path) -> None:
    """The recording the page sends is what the microphone heard, as a 16 kHz 16-bit mono wav."""
    import soundfile

    heard, rate_hz = soundfile.read(io.BytesIO(sent), dtype="float32")
    assert soundfile.info(io.BytesIO(sent)).subtype == "PCM_16" and rate_hz == MIC_RATE_HZ
    assert heard.ndim == 1 and len(heard) >= 0.8 * RECORD_S * MIC_RATE_HZ
    # the fake microphone loops the recording from some point: find one second of what was sent in it
    played, _ = soundfile.read(mic_wav, dtype="float32")
    assert _best_match(np.tile(played, 3), heard[:MIC_RATE_HZ]) > 0.95


def _best_match(signal: np.ndarray, piece: np.ndarray) -> float:
    """The largest normalised cross-correlation of `piece` against every position of `signal`."""
    n = len(signal) + len(piece)  # by FFT: the direct sum over every lag takes seconds
    dots = np.fft.irfft(np.fft.rfft(signal, n) * np.conj(np.fft.rfft(piece, n)), n)[: len(signal) - len(piece) + 1]
    running = np.concatenate([[0.0], np.cumsum(signal.astype(np.float64) ** 2)])
    energies = np.sqrt(np.maximum(running[len(piece) :] - running[: -len(piece)], 0.0))
    return float((dots / (energies * np.linalg.norm(piece) + 1e-9)).max())


@needs_chromium
def test_a_spoken_question_about_an_image_streams_text_and_speech(page, server, real, mic_wav) -> None:
    set_max_tokens(page, SHORT_ANSWER_TOKENS)
    element(page, "image").send_keys(str(real / "extreme_ironing.jpg"))
    record(page, RECORD_S)
    _check_recording(base64.b64decode(_js(page, "return pending.audio.base64")), mic_wav)
    ask(page, text="Answer briefly.")
    assert wait_answered(page) == "done", element(page, "error").text
    assert element(page, "answer").text.strip()
    assert MS.match(element(page, "ttft").text) and MS.match(element(page, "first-audio").text)
    assert int(element(page, "audio-chunks").text) >= 1 and float(element(page, "audio-seconds").text) > 0
    prompt_tokens, completion_tokens = map(int, re.findall(r"\d+", element(page, "usage").text))
    assert 0 < completion_tokens <= SHORT_ANSWER_TOKENS and prompt_tokens > completion_tokens
    # what was asked, in `lyra chat`'s order, and the answer kept for the next turn as its text
    sent = _js(page, "return conversation")
    assert [part["type"] for part in sent[0]["content"]] == ["image_url", "input_audio", "text"]
    assert sent[0]["content"][1]["input_audio"]["format"] == "wav"
    # everything the page loaded and asked came from the server itself
    loaded = _js(page, "return performance.getEntriesByType('resource').map((entry) => entry.name)")
    assert loaded and all(url.startswith((server + "/", "data:")) for url in loaded), loaded
    assert sent[1] == {
        "role": "assistant",
        "content": _js(page, "return document.getElementById('answer').textContent"),
    }


@needs_chromium
def test_stop_cancels_the_answer_and_the_conversation_goes_on(page) -> None:
    set_max_tokens(page, SHORT_ANSWER_TOKENS)
    ask(page, text="Hello.")
    assert wait_answered(page) == "done", element(page, "error").text
    set_max_tokens(page, None)  # the model's own limit: long enough to stop in the middle
    ask(page, text="Tell me more.")
    wait_for(page, lambda d: int(element(d, "audio-chunks").text) >= 1)
    assert page_state(page) == "answering"
    element(page, "stop").click()
    wait_for(page, lambda d: page_state(d) == "idle", 10)
    stopped = element(page, "answer")
    assert "stopped" in (stopped.get_attribute("class") or "")
    assert _js(page, "return player.sources.size") == 0  # nothing left playing
    assert len(_js(page, "return conversation")) == 2  # the stopped turn never happened

    set_max_tokens(page, SHORT_ANSWER_TOKENS)
    ask(page, text="And now?")
    assert wait_answered(page) == "done", element(page, "error").text
    roles = [message["role"] for message in _js(page, "return conversation")]
    assert roles == ["user", "assistant", "user", "assistant"]


@needs_chromium
def test_a_refused_microphone_is_said_plainly(server: str, mic_wav: Path) -> None:
    driver = start_browser(mic_wav, allow_mic=False)
    try:
        driver.get(server + "/")
        _js(driver, "localStorage.setItem('lyra.apiKey', arguments[0])", API_KEY)
        driver.refresh()
        wait_for(driver, _connected, 20)
        element(driver, "record").click()
        wait_for(driver, lambda d: page_state(d) == "error", 10)
        assert element(driver, "error").text.startswith("Microphone access was denied")
    finally:
        driver.quit()


@needs_chromium
def test_a_refused_question_is_said_plainly_and_given_back(page, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"these bytes are not an image")
    ask(page, image=broken, text="What is this?")
    assert wait_answered(page) == "error"
    assert element(page, "error").text.startswith("The server answered 400: ")
    assert _js(page, "return conversation.length") == 0 and not _js(page, "return document.getElementById('answer')")
    # the question is back in the composer, to send again
    assert element(page, "text").get_attribute("value") == "What is this?"
    assert "Image: broken.png" in element(page, "attachments").text


def test_the_page_is_one_file_that_names_nothing_elsewhere() -> None:
    html = PAGE.read_text(encoding="utf-8")
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", html, re.IGNORECASE)
    assert not re.search(r"""<(script|link|img|iframe)[^>]+(src|href)=["'](?!data:)""", html, re.IGNORECASE)
    assert html.count("<script>") == 1 and html.count("<style>") == 1  # inline: no build step, nothing to fetch
