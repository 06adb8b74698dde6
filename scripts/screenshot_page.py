"""Screenshot of `lyra serve`'s web page after a spoken question about an image (docs/serve-page.png).

Starts `lyra serve` on the tiny model (random weights: its answer is nonsense, its timings are real), opens
the page in Debian's headless Chromium whose fake microphone plays a real recording, attaches a real photo,
records two seconds, sends, and saves the page once the answer has ended.

    python scripts/screenshot_page.py                      # writes docs/serve-page.png
    python scripts/screenshot_page.py --out /tmp/page.png --model DIR
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REAL = REPO.parent / "shared" / "data" / "real"
sys.path.insert(0, str(REPO / "tests"))  # the browser helpers the page's test uses

from helpers.browser import (
    ask,
    chromium_missing,
    element,
    lyra_serve,
    mic_recording,
    set_max_tokens,
    start_browser,
    wait_answered,
    wait_for,
)

API_KEY = "screenshot"
ANSWER_TOKENS = 40  # a few lines of text, a few seconds of speech


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "serve-page.png")
    args = parser.parse_args()
    if (missing := chromium_missing()) is not None:
        sys.exit(f"cannot take the screenshot: {missing}")
    with tempfile.TemporaryDirectory() as tmp:
        mic = mic_recording(REAL / "extreme_ironing.mp3", Path(tmp) / "question.wav")
        with lyra_serve(args.model, "--api-key", API_KEY) as url:
            driver = start_browser(mic)
            try:
                driver.get(url + "/")
                driver.execute_script("localStorage.setItem('lyra.apiKey', arguments[0])", API_KEY)
                driver.refresh()
                wait_for(driver, lambda d: element(d, "model").text not in ("connecting…", "not connected"), 20)
                set_max_tokens(driver, ANSWER_TOKENS)
                ask(driver, image=REAL / "extreme_ironing.jpg", record_s=2.0, text="What is unusual in this picture?")
                if wait_answered(driver) != "done":
                    sys.exit(f"the page failed: {element(driver, 'error').text}")
                args.out.parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(args.out))
            finally:
                driver.quit()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
