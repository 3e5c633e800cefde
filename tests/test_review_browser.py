"""The review page in real headless Chromium (Debian's chromium, driven by Playwright) against a real
server on a port: pairwise with keyboard and mouse, a reload mid-way, ratings, curation of an augment
output round-tripped into the curated dataset; sources never reach the browser; bad requests get 4xx."""

from __future__ import annotations

import csv
import io
import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from gpt2lab.review import read_log  # noqa: E402
from gpt2lab.review.reviewset import build, write_review_set  # noqa: E402

from .server_helpers import free_port  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
needs_browser = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install "
                                   "chromium)")
SECRETS = ("SECRET-ALPHA-src", "SECRET-BETA-src")
sync_api.expect.set_options(timeout=30_000)  # a shared 2-core machine: an fsync can take seconds


class Served:
    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError("review server did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def pairwise_file(tmp_path: Path, n: int = 6) -> Path:
    alpha, beta = SECRETS
    rows = {alpha: [(f"Prompt number {k}:", f" alpha text {k} " + "la " * k) for k in range(n)],
            beta: [(f"Prompt number {k}:", f" beta text {k} " + "bo " * (k + 1)) for k in range(n)]}
    review = build(rows, "pairwise", seed=3)
    return write_review_set(review, tmp_path / "pairs.jsonl")


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("needs Debian's chromium")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def shown_sources(page) -> dict[str, str]:
    """Which secret source each label's text comes from (read from the text, which the test made)."""
    out = {}
    for label in "AB":
        text = page.locator(f'#columns .cand[data-label="{label}"] .text').inner_text()
        out[label] = SECRETS[0] if "alpha" in text else SECRETS[1]
    return out


@pytest.mark.slow
@needs_browser
def test_pairwise_keyboard_mouse_reload_and_hidden_sources(browser, tmp_path):
    from gpt2lab.review.app import create_app

    path = pairwise_file(tmp_path)
    log = tmp_path / "log.jsonl"
    served = Served(create_app(path, log, blocklist=["alpha text 2"]))
    bodies: list[str] = []
    expected: list[tuple[str, str, str | None, str]] = []  # (item, choice, winner, comment)
    try:
        context = browser.new_context(viewport={"width": 1280, "height": 860})
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("response", lambda r: bodies.append(r.text()) if r.request.resource_type in ("fetch", "document")
                else None)
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url + " " + (r.post_data or "")))
        page.goto(served.url + "/")
        page.fill("#name", "alice")
        page.keyboard.press("Enter")
        progress = page.locator("#progress-text")
        sync_api.expect(progress).to_have_text("0 / 6 judged")

        def judge(how: str, choice: str, comment: str = "") -> None:
            before = page.locator("#item-id").text_content()
            sides = shown_sources(page)
            if comment:
                page.click("#comment")
                page.keyboard.type(comment)
                page.keyboard.press("a")  # typing in the comment box is not a shortcut
                page.keyboard.press("Escape")
                comment += "a"
            if how == "mouse":
                page.click(f'[data-choice="{choice}"]')
            else:
                page.keyboard.press(how)
            expected.append((before.split()[-1], choice, sides.get(choice), comment))
            sync_api.expect(page.locator("#item-id")).not_to_have_text(before)

        judge("a", "A")
        judge("mouse", "B")
        judge("t", "tie", comment="both are odd")
        sync_api.expect(progress).to_have_text("3 / 6 judged")
        shot = tmp_path / "review-pairwise.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"review screenshot: {shot}")

        page.reload()  # mid-way: the name is remembered and the server knows what alice did
        sync_api.expect(progress).to_have_text("3 / 6 judged")
        judge("2", "B")
        judge("x", "both-bad")
        before = page.locator("#item-id").text_content()
        sides = shown_sources(page)
        page.click('[data-choice="A"]')
        expected.append((before.split()[-1], "A", sides["A"], ""))
        sync_api.expect(page.locator("#finished")).to_be_visible()
        sync_api.expect(progress).to_have_text("6 / 6 judged")
        assert before
        assert not errors, errors
    finally:
        served.stop()
    records = read_log(log)
    assert len(records) == 6 and len({r["item"] for r in records}) == 6
    assert [(r["item"], r["choice"], r["winner"], r["comment"]) for r in records] == expected
    assert all(r["reviewer"] == "alice" and sorted(r["sources"]) == sorted(SECRETS) for r in records)
    # left/right order varies across items (deterministic per reviewer and item)
    assert len({r["sources"][0] for r in records}) == 2
    # the sources never reached the browser: not in the page, not in any response or request
    everything = "\n".join(bodies + requests)
    assert "alpha text" in everything and "/api/judgements" in everything
    for secret in SECRETS:
        assert secret not in everything and "SECRET" not in everything
    assert any('"blocklist":["alpha text 2"]' in b for b in bodies), "the blocklist match is shown"


@pytest.mark.slow
@needs_browser
def test_ratings_with_keyboard_and_mouse(browser, tmp_path):
    from gpt2lab.review.app import create_app

    review = build({"p": [("Q1", " one"), ("Q2", " two")], "q": [("Q1", " uno"), ("Q2", " dos")]}, "ratings",
                   criteria=["fluency", "coherence", "relevance"])
    path = write_review_set(review, tmp_path / "ratings.jsonl")
    log = tmp_path / "log.jsonl"
    served = Served(create_app(path, log))
    try:
        page = browser.new_context(viewport={"width": 1100, "height": 800}).new_page()
        page.goto(served.url + "/")
        page.fill("#name", "bob")
        page.click("#start-button")
        sync_api.expect(page.locator("#progress-text")).to_have_text("0 / 4 judged")
        page.keyboard.press("4")
        page.keyboard.press("5")
        assert page.locator("#submit-ratings").is_disabled()
        page.keyboard.press("3")
        page.keyboard.press("ArrowUp")
        page.keyboard.press("2")  # changes coherence from 5 to 2
        page.keyboard.press("Enter")
        sync_api.expect(page.locator("#progress-text")).to_have_text("1 / 4 judged")
        for crit, v in (("fluency", 1), ("coherence", 2), ("relevance", 5)):
            page.click(f'#criteria button[data-criterion="{crit}"] >> text="{v}"')
        page.click("#submit-ratings")
        sync_api.expect(page.locator("#progress-text")).to_have_text("2 / 4 judged")
        page.screenshot(path=str(tmp_path / "review-ratings.png"), full_page=True)
    finally:
        served.stop()
    records = read_log(log)
    assert [r["scores"] for r in records] == [{"fluency": 4, "coherence": 2, "relevance": 3},
                                              {"fluency": 1, "coherence": 2, "relevance": 5}]


@pytest.fixture(scope="module")
def augment_output(tmp_path_factory):
    """A real augment output (CSV) from a tiny random model: originals and generated rows."""
    import gpt2lab
    from gpt2lab.apps.augment import augment
    from gpt2lab.sampling import SamplingParams

    from .conftest import SHAPES, make_hf_checkpoint

    d = tmp_path_factory.mktemp("review-augment")
    model = gpt2lab.load(make_hf_checkpoint(d / "model", seed=4, **SHAPES["tiny"]))
    data = d / "data.csv"
    with open(data, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label"])
        w.writerows([[1, "The movie was wonderful and I loved it", "pos"], [2, "A dull film, two wasted hours", "neg"],
                     [3, "Great acting and a moving story", "pos"], [4, "Terrible script, I walked out", "neg"]])
    out = d / "augmented.csv"
    augment(model, data, out, label_column="label", per_example=2, min_words=0, similarity=1.0,
            params=SamplingParams(temperature=1.0, max_new_tokens=8, seed=1))
    return out


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "gpt2lab", "review", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
@needs_browser
def test_curation_round_trip_on_an_augment_output(browser, augment_output, tmp_path):
    from gpt2lab.apps.augment import read_output
    from gpt2lab.review.app import create_app

    rows = read_output(augment_output)
    generated = [i for i, r in enumerate(rows) if r["aug_origin"] == "generated"]
    assert len(generated) >= 4
    review_file = tmp_path / "curate.jsonl"
    done = _cli("make", "--augment", str(augment_output), "-o", str(review_file))
    assert done.returncode == 0, done.stderr
    log = tmp_path / "curate.log.jsonl"
    served = Served(create_app(review_file, log))
    try:
        page = browser.new_context(viewport={"width": 1100, "height": 800}).new_page()
        page.goto(served.url + "/")
        page.fill("#name", "carol")
        page.keyboard.press("Enter")
        progress = page.locator("#progress-text")
        sync_api.expect(progress).to_have_text(f"0 / {len(generated)} judged")
        page.keyboard.press("a")  # accept the first generated row
        sync_api.expect(progress).to_have_text(f"1 / {len(generated)} judged")
        page.keyboard.press("1")  # flag: offensive
        page.keyboard.press("3")  # flag: off-topic
        page.click('[data-decision="reject"]')  # reject the second
        sync_api.expect(progress).to_have_text(f"2 / {len(generated)} judged")
        page.keyboard.press("e")  # edit the third
        page.fill("#edit-text", "An edited example, clean and on topic")
        page.keyboard.press("Control+Enter")
        sync_api.expect(progress).to_have_text(f"3 / {len(generated)} judged")
        page.screenshot(path=str(tmp_path / "review-curation.png"), full_page=True)
    finally:
        served.stop()
    records = read_log(log)
    assert [(r["decision"], r["flags"]) for r in records] == [("accept", []), ("reject", ["off-topic", "offensive"]),
                                                              ("edit", [])]
    assert [r["row"] for r in records] == generated[:3]

    curated = tmp_path / "curated.csv"
    done = _cli("export", str(review_file), "--log", str(log), "--out", str(curated), "--json")
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout)
    assert (counts["accepted"], counts["edited"], counts["rejected"]) == (1, 1, 1)
    assert counts["unreviewed"] == len(generated) - 3
    text = curated.read_text(encoding="utf-8")
    assert text.splitlines()[0] == augment_output.read_text(encoding="utf-8").splitlines()[0]  # same columns
    out = list(csv.DictReader(io.StringIO(text)))
    originals = [r for r in rows if r["aug_origin"] == "original"]
    assert [r for r in out if r["aug_origin"] == "original"] == originals
    kept_generated = [r for r in out if r["aug_origin"] == "generated"]
    accepted, rejected, edited = (rows[i] for i in generated[:3])
    assert kept_generated == [accepted, {**edited, "text": "An edited example, clean and on topic"}]
    assert rejected not in out
    assert counts["rows_out"] == len(originals) + 2
    # and with --keep-unreviewed the rows nobody judged stay
    done = _cli("export", str(review_file), "--log", str(log), "--out", str(tmp_path / "all.csv"), "--keep-unreviewed",
                "--json")
    assert json.loads(done.stdout)["rows_out"] == len(rows) - 1


@pytest.mark.slow
def test_api_bounds_and_4xx(tmp_path):
    from gpt2lab.review.app import create_app

    log = tmp_path / "log.jsonl"
    served = Served(create_app(pairwise_file(tmp_path), log))
    try:
        c = httpx.Client(base_url=served.url, timeout=10)
        first = c.get("/api/next", params={"reviewer": "dan"}).json()["item"]["id"]

        def post(body):
            return c.post("/api/judgements", json=body)

        cases = [({"reviewer": "dan", "item": first}, 400, "choice"),
                 ({"reviewer": "dan", "item": first, "choice": "C"}, 400, "choice"),
                 ({"reviewer": "", "item": first, "choice": "A"}, 400, "reviewer"),
                 ({"reviewer": "x" * 65, "item": first, "choice": "A"}, 400, "reviewer"),
                 ({"reviewer": "a\nb", "item": first, "choice": "A"}, 400, "reviewer"),
                 # invisible and reordering characters: "dan\u200b" would count as a second reviewer
                 ({"reviewer": "dan\u200b", "item": first, "choice": "A"}, 400, "reviewer"),
                 ({"reviewer": "\u202edan", "item": first, "choice": "A"}, 400, "reviewer"),
                 ({"reviewer": "d\u2028an", "item": first, "choice": "A"}, 400, "reviewer"),
                 ({"reviewer": "dan", "item": first, "choice": "A", "scores": {"fluency": 3}}, 400, "scores"),
                 ({"reviewer": "dan", "item": first, "choice": "A", "comment": "c" * 2001}, 400, "comment"),
                 ({"reviewer": "dan", "item": "nope", "choice": "A"}, 404, "item"),
                 ({"reviewer": "dan", "item": first, "choice": "A", "source": "x"}, 400, "source"),
                 ({"reviewer": "dan", "item": first, "decision": "accept"}, 400, "choice"),
                 ({"reviewer": "dan", "item": first, "choice": "A", "flags": ["rude"]}, 400, "flags.0")]
        for body, status, param in cases:
            r = post(body)
            assert r.status_code == status, (body, r.text)
            assert r.json()["error"]["param"] == param, (body, r.text)
        assert c.post("/api/judgements", content=b"{not json", headers={"content-type": "application/json"}
                      ).status_code == 400
        assert c.post("/api/judgements", content=b"x" * 300_000, headers={"content-type": "application/json"}
                      ).status_code == 413
        assert c.get("/api/next").status_code == 400
        assert post({"reviewer": "dan", "item": first, "choice": "A"}).status_code == 200
        r = post({"reviewer": "dan", "item": first, "choice": "B"})  # a double submit
        assert r.status_code == 409 and r.json()["error"]["code"] == "already_judged"
        assert c.get("/nope").status_code == 404
    finally:
        served.stop()
    assert len(read_log(log)) == 1


def test_a_restarted_server_resumes_each_reviewer_from_the_log(tmp_path):
    from gpt2lab.review.app import create_app

    path, log = pairwise_file(tmp_path), tmp_path / "log.jsonl"
    served = Served(create_app(path, log))
    try:
        c = httpx.Client(base_url=served.url, timeout=10)
        order = []
        nxt = c.get("/api/next", params={"reviewer": "eve"}).json()
        for choice in ("A", "tie"):
            order.append(nxt["item"]["id"])
            nxt = c.post("/api/judgements", json={"reviewer": "eve", "item": order[-1], "choice": choice}).json()
        third = nxt["item"]["id"]
        other = c.get("/api/next", params={"reviewer": "fay"}).json()
        assert other["progress"]["done"] == 0
    finally:
        served.stop()
    with open(log, "a", encoding="utf-8") as f:  # a crash in the middle of writing a third judgement
        f.write('{"reviewer": "eve", "item": "' + third + '", "mo')
    served = Served(create_app(path, log))  # a new process would do the same: read the log at start
    try:
        c = httpx.Client(base_url=served.url, timeout=10)
        again = c.get("/api/next", params={"reviewer": "eve"}).json()
        assert again["progress"] == {"done": 2, "total": 6} and again["item"]["id"] == third
        # the page order of A and B is the same as before the restart
        assert again["item"]["candidates"] == nxt["item"]["candidates"]
        assert c.post("/api/judgements", json={"reviewer": "eve", "item": order[0], "choice": "B"}).status_code == 409
        assert c.post("/api/judgements", json={"reviewer": "eve", "item": third, "choice": "B"}).status_code == 200
    finally:
        served.stop()
    records = read_log(log)
    assert [(r["item"], r["choice"]) for r in records] == [(order[0], "A"), (order[1], "tie"), (third, "B")]
    assert log.read_text(encoding="utf-8").count("\n") == 3  # the torn tail was cut, not glued to


@pytest.mark.slow
def test_review_serve_command(tmp_path):
    """The console command: real uvicorn on a port, the blocklist and criteria options applied."""
    import os
    import subprocess
    import sys

    review = write_review_set(build({"p": [("x", " one bad word")], "q": [("x", " two")]}, "ratings"),
                              tmp_path / "r.jsonl")
    (tmp_path / "block.txt").write_text("# words to flag\nbad word\n", encoding="utf-8")
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "gpt2lab", "review", "serve", str(review), "--port", str(port),
                             "--blocklist", str(tmp_path / "block.txt"), "--criteria", "clarity,style"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert httpx.get(url + "/api/info").json()["criteria"] == ["clarity", "style"]
        screens = []
        for _ in range(2):
            nxt = httpx.get(url + "/api/next", params={"reviewer": "gil"}).json()["item"]
            screens.append(nxt["candidates"][0]["screen"]["blocklist"])
            r = httpx.post(url + "/api/judgements", json={"reviewer": "gil", "item": nxt["id"],
                                                           "scores": {"clarity": 2, "style": 3}})
            assert r.status_code == 200, r.text
        assert sorted(screens) == [[], ["bad word"]]
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert f"judgements go to {tmp_path / 'r.log.jsonl'}" in out
    assert [r["scores"] for r in read_log(tmp_path / "r.log.jsonl")] == [{"clarity": 2, "style": 3}] * 2


@needs_browser
def test_a_stale_tab_moves_on_instead_of_sticking_on_a_judged_item(browser, tmp_path):
    """The same reviewer in two tabs: the tab still showing an item judged in the other one gets 409 and must
    show the next unjudged item (it stayed stuck on the judged one until a reload)."""
    from gpt2lab.review.app import create_app

    log = tmp_path / "log.jsonl"
    served = Served(create_app(pairwise_file(tmp_path, n=3), log))
    try:
        context = browser.new_context()
        first, second = context.new_page(), context.new_page()
        for page in (first, second):
            page.goto(served.url + "/")
            if page is first:
                page.fill("#name", "carol")
                page.keyboard.press("Enter")
            sync_api.expect(page.locator("#progress-text")).to_have_text("0 / 3 judged")
        stale = first.locator("#item-id").text_content()
        assert second.locator("#item-id").text_content() == stale
        second.keyboard.press("a")
        sync_api.expect(second.locator("#progress-text")).to_have_text("1 / 3 judged")
        first.keyboard.press("b")  # the same item, already judged in the other tab
        sync_api.expect(first.locator("#error")).to_contain_text("already judged")
        sync_api.expect(first.locator("#item-id")).not_to_have_text(stale)
        sync_api.expect(first.locator("#progress-text")).to_have_text("1 / 3 judged")
        first.keyboard.press("t")
        sync_api.expect(first.locator("#progress-text")).to_have_text("2 / 3 judged")
    finally:
        served.stop()
    records = read_log(log)
    assert [r["choice"] for r in records] == ["A", "tie"] and len({r["item"] for r in records}) == 2
