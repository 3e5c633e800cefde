"""The playground page in real headless Chromium (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from .server_helpers import get, start_all  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                                   reason="needs Debian's chromium (apt-get install chromium)")]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def test_playground_streams_text_and_token_probabilities(tmp_path_factory, tiny_checkpoint, tmp_path):
    start_all(tmp_path_factory, tiny_checkpoint)
    server = get("main")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 820})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            requests: list[str] = []
            page.on("request", lambda req: requests.append(req.url))
            page.goto(server.url + "/")
            sync_api.expect(page.locator("#model")).to_contain_text("context 128")

            page.fill("#prompt", "The meaning of life is")
            page.fill("#max-tokens-a", "12")
            page.fill("#max-tokens-b", "12")
            page.fill("#temperature-a", "0")  # greedy on the left, sampling on the right
            page.fill("#temperature-b", "1.3")
            page.fill("#seed", "7")
            page.click("#generate")
            for side in "ab":
                sync_api.expect(page.locator(f"#stats-{side}")).to_contain_text("finished", timeout=60_000)
            tokens_a = page.locator("#output-a .tok")
            assert tokens_a.count() == 12 and page.locator("#output-b .tok").count() == 12
            text_a = page.locator("#output-a").inner_text()
            assert text_a.startswith("The meaning of life is") and len(text_a) > len("The meaning of life is")

            # each token shows its probability and the top alternatives on hover
            tokens_a.nth(2).hover()
            tooltip = page.locator("#tooltip")
            sync_api.expect(tooltip).to_be_visible()
            sync_api.expect(tooltip).to_contain_text("chosen:")
            rows = tooltip.locator("tr")
            assert rows.count() >= 5
            percents = [float(t.rstrip("%")) for t in tooltip.locator("td.p").all_inner_texts()]
            assert percents == sorted(percents, reverse=True) and all(0 < p <= 100 for p in percents)
            # greedy: the chosen token is the most likely alternative
            assert "chosen" in (rows.first.get_attribute("class") or "")
            shot = tmp_path / "playground.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            print(f"playground screenshot: {shot}")

            # the same seed and settings give the same text again
            page.click("body", position={"x": 5, "y": 5})
            page.click("#generate")
            sync_api.expect(page.locator("#stats-b")).to_contain_text("finished", timeout=60_000)
            sync_api.expect(page.locator("#stats-a")).to_contain_text("finished", timeout=60_000)
            assert page.locator("#output-a").inner_text() == text_a
            assert not errors, errors
            assert all(url.startswith(server.url) for url in requests), "the page loads nothing from elsewhere"
        finally:
            browser.close()
