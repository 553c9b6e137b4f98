"""The local labelling page: a FastAPI app served by uvicorn (``rlhf label serve``).

Routes (``/api/*`` behind the optional access token, given as header ``X-Access-Token`` or query
``?token=``; the page and its two static files hold no data and load without it)::

    GET  /                          the page (static/index.html)
    GET  /static/app.js, app.css    its script and style (a fixed set; no path from the URL is opened)
    GET  /api/info                  {pairs, domain}
    GET  /api/next?rater=R          the first pair R has not labelled or skipped (file order), + progress
    GET  /api/pairs/{pair_id}?rater=R   one pair, with R's current label (to go back and relabel)
    POST /api/labels                {pair_id, rater, choice: A|B|tie|skip} -> stored, then answered
    GET  /api/labels?rater=R        R's current labels
    GET  /api/progress?rater=R      {done, labelled, skipped, total}

Safety: binds 127.0.0.1 unless told otherwise (and then needs a token); the Host header must
name this machine when bound to loopback (no DNS rebinding); request bodies over ``max_body``
bytes get 413; inputs are pydantic models with ``extra="forbid"`` and strict types, rater
names and pair ids match fixed patterns and pair ids must be among the loaded pairs (404);
SQL uses parameters only; every label is committed to SQLite (WAL, synchronous=FULL) before
the response is sent; the page sets text with ``textContent`` and a strict CSP.
"""

from __future__ import annotations

import hmac
import json
import logging
import sqlite3
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Sequence

from fastapi import FastAPI, HTTPException, Path as PathParam, Query
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from apps.labelling.pairs import PAIR_ID_PATTERN, RATER_PATTERN, CandidatePair
from apps.labelling.store import Label, LabelStore

log = logging.getLogger("rlhf")

STATIC = Path(__file__).with_name("static")
ASSETS = {"/": ("index.html", "text/html; charset=utf-8"),
          "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/static/app.css": ("app.css", "text/css; charset=utf-8")}
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
MAX_BODY = 16 * 1024
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                 b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]

Rater = Annotated[str, Query(min_length=1, max_length=64, pattern=RATER_PATTERN, description="the rater's name")]
PairId = Annotated[str, PathParam(min_length=1, max_length=64, pattern=PAIR_ID_PATTERN)]


class LabelIn(BaseModel):
    """A posted label; anything else in the body, or a wrong type, is a 422."""

    model_config = ConfigDict(extra="forbid", strict=True)
    pair_id: str = Field(min_length=1, max_length=64, pattern=PAIR_ID_PATTERN)
    rater: str = Field(min_length=1, max_length=64, pattern=RATER_PATTERN)
    choice: Literal["A", "B", "tie", "skip"]


# --------------------------------------------------------------------------- ASGI guard


async def _send_plain(send: Any, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """Host check, access token, request-size limit and security headers, before any route runs."""

    def __init__(self, app: Any, *, token: str | None, max_body: int, check_host: bool):
        self.app, self.token, self.max_body, self.check_host = app, token, max_body, check_host

    def _token_ok(self, scope: dict[str, Any]) -> bool:
        if not self.token:
            return True
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-access-token", b"").decode("latin-1")
        if not given:
            from urllib.parse import parse_qs

            given = (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token") or [""])[0]
        return hmac.compare_digest(given.encode("utf-8"), self.token.encode("utf-8"))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.check_host:
            host = headers.get(b"host", b"").decode("latin-1")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in LOOPBACK:
                await _send_plain(send, 400, "unexpected Host header; open the page at the URL printed by `rlhf label serve`")
                return
        # The page and its script hold no data, so they load without the token (a browser does
        # not send headers for <script src>); every /api route needs it.
        if scope.get("path") not in ASSETS and not self._token_ok(scope):
            await _send_plain(send, 401, "missing or wrong access token; open the URL printed by `rlhf label serve` (it carries ?token=...)")
            return
        # Read the whole body here, up to the limit, so no route ever sees an oversized request.
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await _send_plain(send, 413, f"request body over {self.max_body} bytes")
            return
        body, more = b"", True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.max_body:
                await _send_plain(send, 413, f"request body over {self.max_body} bytes")
                return
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def send_with_headers(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": [*msg.get("headers", []), *SECURITY_HEADERS]}
            await send(msg)

        await self.app(scope, replay, send_with_headers)


# --------------------------------------------------------------------------- app


def pair_view(p: CandidatePair, index: int, total: int) -> dict[str, Any]:
    """What the page shows of a pair: display texts and, for music, the voices. Never file paths."""
    return {"pair_id": p.pair_id, "index": index, "total": total, "domain": p.domain, "prompt": p.display("prompt"),
            "a": {"text": p.display("a"), "notes": p.notes("a")}, "b": {"text": p.display("b"), "notes": p.notes("b")}}


def _label_out(lb: Label | None) -> dict[str, Any] | None:
    return None if lb is None else {"pair_id": lb.pair_id, "rater": lb.rater, "choice": lb.choice, "created_at": lb.created_at,
                                    "updated_at": lb.updated_at, "revision": lb.revision}


def create_app(pairs: Sequence[CandidatePair], store: LabelStore, *, token: str | None = None, max_body: int = MAX_BODY,
               check_host: bool = True, chooser: Callable[[list[Label]], str | None] | None = None) -> Any:
    """The ASGI app (FastAPI behind :class:`Guard`) over the loaded pairs and the label store;
    ``chooser`` (e.g. :class:`apps.labelling.active.ActiveChooser`) picks each rater's next pair
    from their labels so far, instead of the file order."""
    order = [p.pair_id for p in pairs]
    by_id = {p.pair_id: (i, p) for i, p in enumerate(pairs)}
    total = len(pairs)
    domains = {p.domain for p in pairs}
    assets = {route: ((STATIC / name).read_bytes(), media) for route, (name, media) in ASSETS.items()}
    app = FastAPI(title="rlhf labelling", docs_url=None, redoc_url=None, openapi_url=None)

    def progress(rater: str) -> dict[str, int]:
        # store.choices, not store.labels: this runs on every post, and building and sorting every
        # Label of the rater there made each post slower as the session grew (8 raters x 1,000
        # labels: 22 s of server CPU, 14 s with choices and the store's labels_by_rater index).
        labels = [choice for pid, choice in store.choices(rater).items() if pid in by_id]
        skipped = labels.count("skip")
        return {"done": len(labels), "labelled": len(labels) - skipped, "skipped": skipped, "total": total}

    def get_pair(pair_id: str) -> tuple[int, CandidatePair]:
        if pair_id not in by_id:
            raise HTTPException(404, f"unknown pair_id {pair_id!r}")
        return by_id[pair_id]

    @app.exception_handler(sqlite3.OperationalError)
    async def db_busy(_request: Any, exc: sqlite3.OperationalError) -> JSONResponse:
        log.warning("label store: %s", exc)
        return JSONResponse({"detail": "the label database is busy; try again"}, status_code=503)

    def asset(route: str) -> Response:
        data, media = assets[route]
        return Response(data, media_type=media)

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        return asset("/")

    @app.get("/static/app.js", include_in_schema=False)
    def script() -> Response:
        return asset("/static/app.js")

    @app.get("/static/app.css", include_in_schema=False)
    def style() -> Response:
        return asset("/static/app.css")

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {"pairs": total, "domain": next(iter(domains)) if len(domains) == 1 else "mixed"}

    @app.get("/api/next")
    def next_pair(rater: Rater) -> dict[str, Any]:
        if chooser is not None:
            nxt = chooser(store.labels(rater))
        else:
            done = store.done(rater)
            nxt = next((pid for pid in order if pid not in done), None)
        view = pair_view(by_id[nxt][1], by_id[nxt][0], total) if nxt else None
        return {"pair": view, "progress": progress(rater)}

    @app.get("/api/pairs/{pair_id}")
    def one_pair(pair_id: PairId, rater: Rater) -> dict[str, Any]:
        i, p = get_pair(pair_id)
        return {"pair": pair_view(p, i, total), "label": _label_out(store.label(pair_id, rater)), "progress": progress(rater)}

    @app.post("/api/labels")
    def post_label(body: LabelIn) -> dict[str, Any]:
        get_pair(body.pair_id)
        lb = store.put(body.pair_id, body.rater, body.choice)  # committed before we answer
        return {"label": _label_out(lb), "progress": progress(body.rater)}

    @app.get("/api/labels")
    def list_labels(rater: Rater) -> dict[str, Any]:
        return {"labels": [_label_out(lb) for lb in store.labels(rater)]}

    @app.get("/api/progress")
    def get_progress(rater: Rater) -> dict[str, int]:
        return progress(rater)

    return Guard(app, token=token, max_body=max_body, check_host=check_host)


def bind_socket(host: str, port: int) -> Any:
    """A listening TCP socket (port 0 = any free port), so the printed URL has the real port."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say so; without it every
    # response waits ~40 ms for a delayed ACK (Nagle) before its body goes out.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        from rlhf.errors import UserError

        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port (0 = any free port).") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def make_server(app: Any, sock: Any) -> Any:
    """A uvicorn server for ``app`` on ``sock`` (call ``.run(sockets=[sock])``)."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_keep_alive=5,
                            h11_max_incomplete_event_size=16 * 1024)
    return uvicorn.Server(config)
