"""The HTTP layer's own bounds: connection timeouts and the request body size.

``serve`` runs uvicorn on a socket bound beforehand (``gpt2lab serve`` binds it before anything slow
happens, so a busy port fails at once) with timeouts for idle and half-open connections;
``LimitBody`` is the ASGI middleware that refuses an oversized or too slow request body.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..http_guard import send_error

if TYPE_CHECKING:
    from .limits import Limits

H11_MAX_INCOMPLETE_EVENT_SIZE = 64 * 1024  # request line + headers (h11's default is 16 KiB)
_DRAIN_BYTES = 64 * 2**20  # an oversized body is read and dropped up to this much before the 413


def _timed_h11() -> type:
    """uvicorn's h11 protocol, plus a deadline for a complete request head.

    uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but waits forever for a
    connection that never sends its request line and headers (a half-open or slowloris client). This
    closes such a connection ``header_timeout_s`` after it opened or after its last response."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        header_timeout_s = 30.0
        _head_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _head_timeout(self) -> None:
            self._head_timer = None
            if not self._in_request() and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._in_request():
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return TimedH11Protocol


def serve(app: Any, sock: socket.socket, *, log_level: str, limits: Limits) -> None:
    """Run ``app`` with uvicorn on the already bound ``sock`` until interrupted."""
    import uvicorn

    protocol = _timed_h11()
    protocol.header_timeout_s = limits.header_timeout_s
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol,
                            timeout_keep_alive=limits.keep_alive_s, timeout_graceful_shutdown=5,
                            h11_max_incomplete_event_size=H11_MAX_INCOMPLETE_EVENT_SIZE)
    uvicorn.Server(config).run(sockets=[sock])


class LimitBody:
    """ASGI middleware: a request body over ``limits.max_body_bytes`` gets 413, one that does not
    arrive within ``limits.body_timeout_s`` gets 408, both with OpenAI's error body; neither reaches
    the app. The body is read here (bounded) and handed on to the app unchanged."""

    def __init__(self, app: Any, limits: Limits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.limits.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length")
        declared = int(length) if length is not None and length.isdigit() else 0
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                if size > limit or declared > limit:  # too large whatever else arrives: that is the answer
                    await self._refuse(send, 413, self._too_large(max(size, declared)), "request_too_large")
                else:
                    await self._refuse(send, 408, f"the request body did not arrive within "
                                       f"{self.limits.body_timeout_s:g} s", "request_timeout")
                return
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
            if size > limit or declared > limit:
                # Read on (and drop) what the client is still sending, within bounds, so that it gets
                # to read the 413 instead of a connection reset in the middle of its upload.
                if more and size < _DRAIN_BYTES:
                    continue
                await self._refuse(send, 413, self._too_large(max(size, declared)), "request_too_large")
                return
            chunks.append(message.get("body", b""))
            if not more:
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: the client's disconnect, as the app expects

        await self.app(scope, replay, send)

    def _too_large(self, size: int) -> str:
        return (f"the request body ({size} bytes or more) is larger than this server's limit of "
                f"{self.limits.max_body_bytes} bytes (--max-body-mb)")

    @staticmethod
    async def _refuse(send: Callable, status: int, message: str, code: str) -> None:
        await send_error(send, status, message, code, headers=[(b"connection", b"close")])
