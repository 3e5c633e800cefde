"""What keeps gpt2lab's local web servers (``gpt2lab serve``, ``gpt2lab review serve``) from being used by
other web sites: one ASGI middleware, :class:`HostOriginGuard`, in front of both apps.

A server on 127.0.0.1 is reachable from any page the user's browser opens. Two attacks follow, and each
check here stops one of them:

- **DNS rebinding.** A page at ``http://evil.example:8000`` re-points ``evil.example`` at 127.0.0.1 and
  then talks to the local server *as its own origin*: the browser sends ``Host: evil.example:8000`` and
  lets the page read every answer. The server answers only requests whose ``Host`` is one of its own
  names (:func:`allowed_hosts`: loopback names, the address it is bound to, names the user adds), as
  Jupyter and Vite do. An IP address cannot be re-pointed, so a host written as an IP needs no name
  check beyond being the server's own address.
- **Cross-site requests.** Any page may send a "simple" POST (``text/plain``, a form, a body with no
  content type) to 127.0.0.1 without asking first; the browser only hides the answer. Whether such a
  body is read as JSON depends on the FastAPI version (older ones parse a body without a content
  type as JSON). Here every state-changing request (any method but GET, HEAD, OPTIONS) must say
  ``Content-Type: application/json`` (or ``application/*+json``), which no page can send to another origin
  without a CORS preflight, and when it comes from a browser (an ``Origin`` header, or ``Sec-Fetch-Site``)
  that origin must be the server's own or one the user allowed (``--cors-allow-origin``): OWASP's
  "verifying origin with standard headers".

Clients that are not browsers (curl, the ``openai`` client, scripts) send no ``Origin`` and are served as
before. A refusal has OpenAI's error body (:func:`error_body`): 403 ``host_not_allowed`` or
``origin_not_allowed``, 415 ``unsupported_media_type``.

This module is a foundation module: pure ASGI and the standard library, usable by every layer.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # RFC 9110's safe methods: they change nothing
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # a request of these must be JSON even with an empty body
LOOPBACK_NAMES = ("localhost",)  # and every *.localhost (RFC 6761: always loopback) and loopback IP
_HOST_NAME = re.compile(r"(\*|\.?[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?)")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_SHOWN_CHARS = 120  # a header quoted in an error is cut to this


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body, ``{"error": {"message", "type", "param", "code"}}``, as both servers answer.

    A message or param may quote a client's text: characters JSON cannot carry as UTF-8 (a lone
    surrogate) are written as ``\\udXXX`` escapes, so the error itself never fails to encode."""
    return {"error": {"message": printable(message), "type": type,
                      "param": None if param is None else printable(param), "code": code}}


def printable(text: str) -> str:
    """``text`` with what UTF-8 cannot encode (lone surrogates) written as backslash escapes."""
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an IP address, IPv6 with or without brackets) only reaches this machine:
    ``localhost``, ``*.localhost`` or a loopback address."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # any other name may resolve anywhere


def check_allowed_host(value: str) -> str:
    """``value`` as an ``--allowed-host`` entry: a host name (``example.org``), a domain and all its
    subdomains (``.example.org`` or ``*.example.org``), an IP address, or ``*`` (any host: the check is
    off). Lower-cased; ``ValueError`` saying what is wrong (a port, a scheme or a path)."""
    host = value.strip().lower()
    if host.startswith("*."):  # the common spelling of a wildcard: the same as .example.org
        host = host[1:]
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if _is_ip(host):
        return host
    if not _HOST_NAME.fullmatch(host) or ".." in host:
        raise ValueError(f"--allowed-host must be a host name (example.org), .example.org for a domain and its "
                         f"subdomains, an IP address, or * for any; no scheme, port or path: got {value!r}")
    return host


def allowed_hosts(bound: str | None = None, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The hosts a server answers by default: ``localhost`` (and every loopback name and address, always),
    the address it is bound to (``bound``: a name or IP; ``0.0.0.0`` / ``::`` stand for every address of
    the machine, so then any IP address), and ``extra`` (``--allowed-host`` entries, checked by
    :func:`check_allowed_host`). ``ValueError`` names a bad entry."""
    hosts = list(LOOPBACK_NAMES)
    if bound:
        host = bound.strip("[]").lower()
        hosts.append("0.0.0.0/0" if _is_ip(host) and ipaddress.ip_address(host).is_unspecified else host)
    hosts.extend(check_allowed_host(h) for h in extra)
    return tuple(dict.fromkeys(hosts))


@dataclass(frozen=True)
class _Origin:
    scheme: str
    host: str
    port: int | None

    @classmethod
    def parse(cls, text: str) -> _Origin | None:
        match = re.fullmatch(r"([a-z][a-z0-9+.-]*)://(\[[^\]]*\]|[^:/\[\]]*)(?::(\d{1,5}))?/?", text.strip().lower())
        if not match:
            return None
        scheme, host, port = match.groups()
        return cls(scheme, host.strip("[]"), int(port) if port else _DEFAULT_PORTS.get(scheme))


def _split_host(header: str) -> tuple[str, int | None] | None:
    """``Host`` header -> (host, port or None); None when it is not a host[:port]."""
    match = re.fullmatch(r"(\[[0-9a-f:.]+\]|[^:\[\]/\s@]+)(?::(\d{1,5}))?", header.strip().lower())
    if not match:
        return None
    host, port = match.groups()
    return host.strip("[]").rstrip("."), int(port) if port else None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _host_matches(host: str, pattern: str) -> bool:
    if pattern == "*" or host == pattern:
        return True
    if pattern == "0.0.0.0/0":  # bound to every address: any IP the machine may have
        return _is_ip(host)
    return pattern.startswith(".") and (host == pattern[1:] or host.endswith(pattern))


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    main, _, sub = media.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


class HostOriginGuard:
    """ASGI middleware in front of a local web app (see the module's description).

    ``hosts``: the ``Host`` values answered (:func:`allowed_hosts`; loopback names and addresses are
    always answered, ``*`` answers any). ``origins``: the other browser origins (``scheme://host[:port]``,
    or ``*``) whose pages may change state, the same list CORS allows them to read from; a page's own
    origin (the request's ``Host``) always may. Every request but GET, HEAD and OPTIONS must send a JSON
    content type."""

    def __init__(self, app: Any, hosts: Iterable[str] = LOOPBACK_NAMES, origins: Iterable[str] = ()) -> None:
        self.app = app
        self.hosts = tuple(h.lower() for h in hosts)
        self.any_host = "*" in self.hosts
        origins = list(origins)
        self.any_origin = "*" in origins
        self.origins = {o for o in map(_Origin.parse, origins) if o is not None}

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        refusal = self.refusal(scope["method"], headers)
        if refusal is not None:
            await send_error(send, *refusal, headers=[(b"vary", b"Origin")])
            return
        await self.app(scope, receive, send)

    def host_allowed(self, host: str) -> bool:
        """Whether the host part of a ``Host`` header is one of this server's names."""
        return self.any_host or is_loopback(host) or any(_host_matches(host, p) for p in self.hosts)

    def refusal(self, method: str, headers: dict[str, str]) -> tuple[int, str, str] | None:
        """Why a request with ``method`` and ``headers`` (lower-case names) is refused, as (status, message,
        code), or None when it may go on."""
        host_header = headers.get("host")
        own = _split_host(host_header) if host_header is not None else None
        # no Host at all is an HTTP/1.0 client, never a browser; a malformed one is refused
        if host_header is not None and (own is None or not self.host_allowed(own[0])):
            return (403, f"Host {_shown(host_header)} is not a name of this server (it answers localhost, its own "
                    "address and the names given with --allowed-host): a web page may have re-pointed its name "
                    "here (DNS rebinding)", "host_not_allowed")
        if method.upper() in SAFE_METHODS:
            return None
        origin = headers.get("origin")
        if origin is not None and not self._origin_allowed(origin, own):
            return (403, f"a page from {_shown(origin)} may not change anything on this server (a cross-site "
                    "request); allow its origin with --cors-allow-origin", "origin_not_allowed")
        if origin is None and headers.get("sec-fetch-site", "").lower() in ("cross-site", "same-site"):
            return (403, "a page of another site may not change anything on this server (Sec-Fetch-Site: "
                    f"{_shown(headers['sec-fetch-site'])})", "origin_not_allowed")
        content_type = headers.get("content-type")
        # a bodiless DELETE (or another method no route takes) goes on to the router's 405: only a body can
        # carry the cross-site "simple request" this check stops
        has_body = method.upper() in _BODY_METHODS or headers.get("content-length", "0") != "0" \
            or "transfer-encoding" in headers
        if has_body and (content_type is None or not _is_json(content_type)):
            got = "no Content-Type" if content_type is None else f"Content-Type {_shown(content_type)}"
            return (415, f"the request body must be JSON, sent with Content-Type: application/json; got {got}",
                    "unsupported_media_type")
        return None

    def _origin_allowed(self, origin: str, own: tuple[str, int | None] | None) -> bool:
        if self.any_origin:
            return True
        parsed = _Origin.parse(origin)  # "null" (a sandboxed frame, a file:// page) parses to None
        if parsed is None:
            return False
        if parsed in self.origins:
            return True
        if own is None:
            return False
        host, port = own  # the page's own origin is this server's: same host, same port (or the scheme's)
        return parsed.host == host and parsed.port == (port if port is not None else _DEFAULT_PORTS.get(parsed.scheme))


def _shown(value: str) -> str:
    return repr(value if len(value) <= _SHOWN_CHARS else value[:_SHOWN_CHARS] + "...")


async def send_error(send: Callable, status: int, message: str, code: str,
                     headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """Answer an ASGI request from a middleware with ``status`` and OpenAI's error body (``code``)."""
    payload = json.dumps(error_body(message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload})
