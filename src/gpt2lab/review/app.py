"""The review page and its JSON API (FastAPI): ``create_app(review_file, log)``.

Routes: ``GET /`` the page; ``GET /api/info`` the mode, criteria and flags; ``GET /api/next?reviewer=``
the reviewer's next item and progress; ``POST /api/judgements`` one judgement, appended to the log
(fsynced) before the answer, which carries the next item; ``GET /health``.

Sources never leave the server: an item goes out as its opaque id, its prompt and its texts labelled
A/B (pairwise: which candidate is A is decided per reviewer and item by a hash, so it is random across
items yet the same after a reload). Each reviewer sees the items in their own hash order (the file's
order when curating) and resumes at the first one they have not judged. Errors are OpenAI-shaped
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for a client's mistake.
"""

from __future__ import annotations

import hashlib
import threading
import unicodedata
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..http_guard import LOOPBACK_NAMES, HostOriginGuard, error_body
from .log import CHOICES, DECISIONS, JudgementLog
from .reviewset import FLAGS, MAX_NAME_CHARS, MAX_TEXT_CHARS, ReviewSet, read_review_set
from .screening import screen_texts

MAX_COMMENT_CHARS = 2000
MAX_BODY_BYTES = 256 * 1024


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(error_body(message, type=kind, param=param, code=code), status)


class JudgementIn(BaseModel):
    """One judgement from the page. Which fields apply depends on the mode."""

    model_config = ConfigDict(extra="forbid")
    reviewer: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    item: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    choice: Literal["A", "B", "tie", "both-bad"] | None = None  # pairwise
    scores: dict[str, int] | None = Field(None, max_length=10)  # ratings: criterion -> 1..5
    decision: Literal["accept", "reject", "edit"] | None = None  # curation
    text: str | None = Field(None, max_length=MAX_TEXT_CHARS)  # curation edit
    flags: list[Literal["offensive", "misleading", "off-topic", "other"]] = Field(default_factory=list, max_length=4)
    comment: str = Field("", max_length=MAX_COMMENT_CHARS)


def _digest(*parts: str) -> bytes:
    return hashlib.sha256("\0".join(parts).encode("utf-8")).digest()


MODE_FIELDS = {"pairwise": ("choice",), "ratings": ("scores",), "curation": ("decision", "text")}


def _mode_of(field: str) -> str:
    return next(mode for mode, fields in MODE_FIELDS.items() if field in fields)


def check_reviewer(name: str) -> str:
    """The reviewer's name, NFC-normalised: 1 to MAX_NAME_CHARS printable characters (``str.isprintable``: no
    control, format (zero-width, bidirectional overrides) or line/paragraph separator characters, so one person
    cannot pass for two, nor a name reorder what a terminal shows). ``APIError`` 400 naming ``reviewer``."""
    name = unicodedata.normalize("NFC", name.strip())
    if not (1 <= len(name) <= MAX_NAME_CHARS and name.isprintable()):
        raise APIError(400, f"reviewer: a name of 1 to {MAX_NAME_CHARS} printable characters", "reviewer")
    return name


def create_app(review: str | Path | ReviewSet, log: str | Path, *, blocklist: list[str] | tuple[str, ...] = (),
               similarity: float = 0.7, title: str | None = None,
               allowed_hosts: Sequence[str] = LOOPBACK_NAMES) -> FastAPI:
    """The review app over a review file (or a loaded :class:`ReviewSet`), appending to the JSONL ``log``.

    The log is read at once (a torn last line from a crash is cut off), so reviewers resume where they
    stopped. ``blocklist``: words or phrases flagged in the pre-screening; ``similarity``: the character
    3-gram Jaccard similarity above which two candidates are shown as near-duplicates.
    ``allowed_hosts``: the ``Host`` names answered besides the loopback ones
    (:func:`gpt2lab.http_guard.allowed_hosts`), 403 for others; a judgement must be JSON (415) and, from a
    browser, come from the page itself (403): :class:`~gpt2lab.http_guard.HostOriginGuard`, so no other web
    site can read the items or log judgements.
    Raises ``ValueError`` / ``FileNotFoundError`` for a bad review file or log.
    """
    rs = review if isinstance(review, ReviewSet) else read_review_set(review)
    title = title or (Path(review).name if not isinstance(review, ReviewSet) else "review")
    journal = JudgementLog(log)
    by_id = {it.id: it for it in rs.items}
    keys = [it.id for it in rs.items for _ in it.candidates]
    screens_flat = screen_texts(keys, [c.text for it in rs.items for c in it.candidates], blocklist=blocklist,
                                similarity=similarity)
    screens: dict[str, list[dict]] = {}
    k = 0
    for it in rs.items:
        screens[it.id] = [s.to_dict() for s in screens_flat[k:k + len(it.candidates)]]
        k += len(it.candidates)
    done: dict[str, set[str]] = {}
    for r in journal.records:
        if r.get("item") in by_id:
            done.setdefault(str(r.get("reviewer")), set()).add(r["item"])
    lock = threading.Lock()
    orders: dict[str, list[str]] = {}

    def order(reviewer: str) -> list[str]:
        if reviewer not in orders:
            if len(orders) >= 1024:  # any name may ask: keep the cache bounded
                orders.clear()
            ids = [it.id for it in rs.items]
            orders[reviewer] = ids if rs.mode == "curation" else sorted(ids, key=lambda i: _digest(reviewer, i))
        return orders[reviewer]

    def flipped(reviewer: str, item_id: str) -> bool:
        """Whether the file's second candidate is shown as A to this reviewer."""
        return rs.mode == "pairwise" and bool(_digest(reviewer, item_id, "side")[0] & 1)

    def next_payload(reviewer: str) -> dict[str, Any]:
        mine = done.get(reviewer, set())
        total = len(rs.items)
        item_id = next((i for i in order(reviewer) if i not in mine), None)
        out: dict[str, Any] = {"progress": {"done": len(mine), "total": total}, "item": None}
        if item_id is None:
            return out
        it = by_id[item_id]
        idx = [1, 0] if flipped(reviewer, item_id) else list(range(len(it.candidates)))
        out["item"] = {"id": it.id, "prompt": it.prompt,
                       "candidates": [{"label": "AB"[n], "text": it.candidates[i].text, "screen": screens[it.id][i]}
                                      for n, i in enumerate(idx)]}
        return out

    app = FastAPI(title="gpt2lab review", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.review, app.state.log = rs, journal

    @app.middleware("http")
    async def bound_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return _error(413, f"request body over {MAX_BODY_BYTES} bytes", code="body_too_large")
        if request.method == "POST" and length is None:
            return _error(411, "send a Content-Length header", code="length_required")
        return await call_next(request)

    # added last, so outermost: another site's request is refused before anything reads it (no CORS here)
    app.add_middleware(HostOriginGuard, hosts=allowed_hosts)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return _error(400, "the request body is not valid JSON")
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query")]
        param = ".".join(loc) or None
        return _error(400, f"{param or 'request body'}: {first.get('msg', 'invalid')}", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        html = resources.files("gpt2lab.review").joinpath("static/review.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {"title": title, "mode": rs.mode, "criteria": rs.criteria, "flags": list(FLAGS),
                "items": len(rs.items), "max_comment_chars": MAX_COMMENT_CHARS}

    @app.get("/api/next")
    def next_item(reviewer: str = Query(..., max_length=256)) -> dict[str, Any]:
        return next_payload(check_reviewer(reviewer))

    @app.post("/api/judgements")
    def judge(body: JudgementIn) -> dict[str, Any]:
        reviewer = check_reviewer(body.reviewer)
        it = by_id.get(body.item)
        if it is None:
            raise APIError(404, f"item: no item {body.item!r} in this review", "item", "item_not_found")
        record: dict[str, Any] = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                                  "reviewer": reviewer, "item": it.id, "mode": rs.mode}
        if rs.mode == "pairwise":
            if body.choice is None:
                raise APIError(400, f"choice: one of {', '.join(CHOICES)}", "choice")
            left, right = [c.source for c in it.candidates]
            if flipped(reviewer, it.id):
                left, right = right, left
            winner = {"A": left, "B": right}.get(body.choice)
            record.update(sources=[left, right], choice=body.choice, winner=winner)
        elif rs.mode == "ratings":
            scores = body.scores or {}
            if set(scores) != set(rs.criteria):
                raise APIError(400, f"scores: give a score for each of {', '.join(rs.criteria)}", "scores")
            bad = [c for c, v in scores.items() if not 1 <= v <= 5]
            if bad:
                raise APIError(400, f"scores.{bad[0]}: a score is an integer from 1 to 5", f"scores.{bad[0]}")
            record.update(source=it.candidates[0].source, scores={c: scores[c] for c in rs.criteria})
        else:
            if body.decision is None:
                raise APIError(400, f"decision: one of {', '.join(DECISIONS)}", "decision")
            record.update(row=it.row, source=it.candidates[0].source, decision=body.decision)
            if body.decision == "edit":
                if body.text is None or not body.text.strip():
                    raise APIError(400, "text: an edit needs the new text", "text")
                record["text"] = body.text
            elif body.text is not None:
                raise APIError(400, "text: only an edit carries a text", "text")
        own = MODE_FIELDS[rs.mode]  # a field of another mode is a client's mistake, never silently dropped
        foreign = [f for fields in MODE_FIELDS.values() for f in fields if f not in own and getattr(body, f)]
        if foreign:
            raise APIError(400, f"{foreign[0]}: only in {_mode_of(foreign[0])} mode, not {rs.mode}", foreign[0])
        record.update(flags=sorted(set(body.flags)), comment=body.comment)
        with lock:
            mine = done.setdefault(reviewer, set())
            if it.id in mine:
                raise APIError(409, f"item: {reviewer!r} has already judged {it.id}", "item", "already_judged")
            journal.append(record)
            mine.add(it.id)
        return next_payload(reviewer)

    return app
