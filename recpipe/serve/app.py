"""`recpipe serve`: a FastAPI app over one trained run, and the uvicorn server that runs it.

Routes: POST /recommend, GET /items/{id}, GET /items?q=, GET /users, GET /healthz, GET /readyz, GET /metrics,
POST /admin/reload, GET / (the page), /docs (OpenAPI). The run is loaded once, in the background after the
socket is bound (the lifespan hook), so /healthz answers at once and /readyz says 503 until the service can
answer; the first log line says what was loaded. A reload loads the new run beside the old one and swaps
it in; requests already admitted finish on the old one.

Security: an API key from $RECPIPE_API_KEY (never logged), compared with hmac.compare_digest, guards every
route that reads data or changes state (all but the health checks, the page and the OpenAPI schema, which hold
none); bodies are capped in bytes before they are parsed; CORS is off unless origins are given. Bad input is a
4xx with {"error": "<one line>"}; nothing answers with a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import os
import pickle
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from recpipe.config import Config
from recpipe.errors import ConfigError, RecpipeError
from recpipe.serve.batcher import MicroBatcher
from recpipe.serve.engine import Answer, Engine, Limits, RequestError

API_KEY_ENV = "RECPIPE_API_KEY"
SETTINGS_ENV = "RECPIPE_SERVE_SETTINGS"  # workers > 1: the pickled settings each worker process reads
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/", "/docs", "/openapi.json", "/docs/oauth2-redirect"})


@dataclass
class ServeSettings:
    cfg: Config
    model: str | None = None  # None: train.model
    host: str = "127.0.0.1"  # loopback: nothing off this machine reaches the service unless asked to
    port: int = 8000
    workers: int = 1  # processes, each with its own copy of the run (and its own /metrics)
    # under load, how long the batcher waits for more requests to fill a batch; a lone request never waits
    batch_window_ms: float = 2.0
    max_batch: int = 64  # one denoiser forward and one FAISS search; bounds what one batch adds to latency
    threads: int = 1  # torch threads per batch: on 2 cores the event loop (HTTP, JSON) needs the other one
    max_body_bytes: int = 256 * 1024  # a request is a few KB; max_history + max_exclude ids fit in this
    cors_origins: tuple[str, ...] = ()  # CORS off: a page from another origin cannot call the service
    limits: Limits = field(default_factory=Limits)
    log_level: str = "warning"  # uvicorn's own messages; the service's lines are printed regardless


# ------------------------------------------------------------------------------------------------ schemas
Id = str | int  # item and user ids as the dataset writes them; JSON numbers are accepted too


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: Id | None = Field(None, description="a known user id (or give `history`)")
    history: list[Id] | None = Field(None, description="item ids, oldest first: a visitor the model never saw")
    intent: str | None = Field(None, description="what the user asks for, in words")
    k: int | None = Field(None, description="how many items (default: recommend.k)")
    w: float | None = Field(None, allow_inf_nan=False, description="history guidance (default: the model's)")
    rho: float | None = Field(None, allow_inf_nan=False, description="intention strength (default: the model's)")
    exclude: list[Id] | None = Field(None, description="item ids never to return")
    exclude_seen: bool = Field(True, description="leave out the items of the history")


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run_dir: str | None = Field(None, description="another run directory (default: the one being served)")
    model: str | None = None


# ------------------------------------------------------------------------------------------------ metrics
class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("recpipe_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("recpipe_request_seconds", "request latency by route", ["route"], registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch = Histogram("recpipe_batch_size", "requests answered by one batch", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_seconds = Histogram("recpipe_batch_seconds", "time to answer one batch", registry=r,
                                       buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.intent_cache = Counter("recpipe_intent_cache", "intents by cache outcome", ["outcome"], registry=r)
        self.reloads = Counter("recpipe_reloads", "run reloads by outcome", ["outcome"], registry=r)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ------------------------------------------------------------------------------------------------- state
class State:
    """What the app serves: the current engine (swapped by a reload), its batcher, readiness."""

    def __init__(self, settings: ServeSettings, log: Callable[[str], None]):
        self.settings = settings
        self.log = log
        self.engine: Engine | None = None
        self.error: Exception | None = None
        self.stopping = False
        self.metrics = Metrics()
        self.batcher = MicroBatcher(settings.batch_window_ms / 1000, settings.max_batch, settings.threads,
                                    on_batch=self._on_batch)
        self.reload_lock = asyncio.Lock()
        self.api_key = os.environ.get(API_KEY_ENV) or None
        self.on_fatal: Callable[[], None] | None = None

    def _on_batch(self, n: int, seconds: float) -> None:
        self.metrics.batch.observe(n)
        self.metrics.batch_seconds.observe(seconds)

    def load(self, cfg: Config, model: str | None) -> tuple[Engine, list[str]]:
        """A loaded and warmed engine, and the lines its loading logged (printed after the summary)."""
        lines: list[str] = []
        engine = Engine(cfg, model, self.settings.limits, log=lines.append)
        lines += warm(engine)
        return engine, lines


def warm(engine: Engine) -> list[str]:
    """Load what the first intent request would (TEM, training intentions) and run one forward, so that
    readiness means answering at full speed."""
    svc, lines = engine.svc, []
    if engine.model.uses_intent and svc.index is not None:
        _quiet_transformers()
        try:
            svc.tem().encode(["warm up"])
            svc.intent_bank()
        except RecpipeError as e:
            lines.append(f"intents unavailable: {str(e).splitlines()[0]}")
    if engine.user_ids:
        engine.run_batch([engine.parse(engine.user_ids[0], None, None, 1, None, None, None, True)])
    return lines


def _quiet_transformers() -> None:
    """No weight-loading progress bar from the TEM: the service's first line says what it loaded."""
    try:
        from transformers.utils import logging as tf_logging

        tf_logging.disable_progress_bar()
    except ImportError:
        pass


def describe(engine: Engine, settings: ServeSettings, key: bool) -> str:
    s = engine.summary()
    return (f"recpipe serve: {s['model']} from {s['run_dir']}: {s['items']:,} items, {s['users']:,} users, "
            f"index {s['index'] or 'none (score_all)'}, device {s['device']}, TEM {s['tem'] or 'none'}, "
            f"intent anchoring {s['intent_anchor']}; http://{settings.host}:{settings.port} "
            f"(API key {'required' if key else 'off'}, batch window {settings.batch_window_ms:g} ms)")


# ---------------------------------------------------------------------------------------------------- app
def _error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(reason).split())[:300]}, status_code=status)


def _validation_reason(exc: RequestValidationError) -> tuple[int, str]:
    errs = exc.errors()
    if not errs:
        return 422, "invalid request"
    e = errs[0]
    if e.get("type") == "json_invalid":
        return 400, f"malformed JSON: {e.get('ctx', {}).get('error', 'cannot parse the body')}"
    loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
    msg = e.get("msg", "invalid")
    if e.get("type") == "finite_number":
        msg = "must be a finite number"
    return 422, f"{loc}: {msg}"


def create_app(settings: ServeSettings, log: Callable[[str], None] | None = None,
               on_fatal: Callable[[], None] | None = None) -> FastAPI:
    log = log or _print
    state_box: dict[str, State] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        st = State(settings, log)
        st.on_fatal = on_fatal
        state_box["s"] = app.state.recpipe = st
        st.batcher.start()
        task = asyncio.get_running_loop().create_task(_initial_load(st))
        try:
            yield
        finally:
            st.stopping = True
            task.cancel()
            await st.batcher.stop()

    app = FastAPI(title="recpipe", version="1", lifespan=lifespan,
                  description="Intention-guided next-item recommendation from a trained recpipe run.")
    app.add_middleware(_Guard, settings=settings, state_box=state_box)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type", "X-API-Key", "Authorization"])

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _error(*_validation_reason(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, exc.detail)

    @app.exception_handler(RequestError)
    async def _refused(request: Request, exc: RequestError):
        return _error(exc.status, exc.reason)

    def st(request: Request) -> State:
        return request.app.state.recpipe

    def ready_engine(request: Request) -> Engine:
        s = st(request)
        if s.engine is None:
            why = "loading the run" if s.error is None else "the run failed to load"
            raise RequestError(503, f"not ready: {why}")
        return s.engine

    @app.get("/healthz", tags=["health"])
    async def healthz():
        return {"ok": True}

    @app.get("/readyz", tags=["health"])
    async def readyz(request: Request):
        s = st(request)
        if s.engine is None or s.stopping:
            why = "stopping" if s.stopping else ("loading" if s.error is None else f"failed: {s.error}")
            return JSONResponse({"ready": False, "reason": why}, status_code=503)
        return {"ready": True, **s.engine.summary()}

    @app.get("/metrics", tags=["health"])
    async def metrics(request: Request):
        return Response(st(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/recommend", tags=["recommend"])
    async def recommend(request: Request, body: Annotated[RecommendRequest, Body()]):
        s, engine = st(request), ready_engine(request)
        q = engine.parse(None if body.user is None else str(body.user),
                         None if body.history is None else [str(i) for i in body.history],
                         body.intent, body.k, body.w, body.rho,
                         None if body.exclude is None else [str(i) for i in body.exclude], body.exclude_seen)
        ans = await s.batcher.submit(engine, q)
        if q.intent is not None:
            s.metrics.intent_cache.labels("hit" if q.cache_hit else "miss").inc()
        if isinstance(ans, RequestError):
            raise ans
        if isinstance(ans, Exception):
            s.log(f"recommend: internal error: {type(ans).__name__}: {str(ans).splitlines()[0] if str(ans) else ''}")
            raise RequestError(500, "internal error; the server logged it")
        return _answer_json(engine, q, ans)

    @app.get("/items/{item_id}", tags=["items"])
    async def item(request: Request, item_id: str):
        return ready_engine(request).item(item_id)

    @app.get("/items", tags=["items"])
    async def items(request: Request, q: Annotated[str, Query(max_length=200)] = "",
                    limit: Annotated[int, Query(ge=1, le=100)] = 20):
        return {"items": ready_engine(request).search(q, limit)}

    @app.get("/users", tags=["items"])
    async def users(request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 50):
        return {"users": ready_engine(request).users(limit)}

    @app.post("/admin/reload", tags=["admin"])
    async def reload(request: Request, body: Annotated[ReloadRequest | None, Body()] = None):
        return await _reload(st(request), body or ReloadRequest())

    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse(resources.files("recpipe.serve").joinpath("static/index.html").read_text("utf-8"))

    return app


def _answer_json(engine: Engine, q, ans: Answer) -> dict[str, Any]:
    out: dict[str, Any] = {"model": engine.model_name, "k": q.k, "intent": ans.intent, "items": ans.items}
    if q.user is not None:
        out["user"] = q.user
    if ans.intent is not None:
        out["anchored"] = ans.anchored
    return out


async def _initial_load(s: State) -> None:
    st = s.settings
    try:
        engine, lines = await asyncio.to_thread(s.load, st.cfg, st.model)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - reported as one line; the process then stops
        s.error = e
        if s.on_fatal is not None:
            s.on_fatal()  # the caller reports it (`recpipe serve`: "error: ..." and exit 2)
        else:
            s.log(f"error: {_one_line(e)}")
            os.kill(os.getpid(), signal.SIGTERM)
        return
    s.engine = engine
    s.log(describe(engine, st, s.api_key is not None))
    for line in lines:
        s.log(line)


async def _reload(s: State, body: ReloadRequest) -> dict[str, Any]:
    if s.reload_lock.locked():
        raise RequestError(409, "a reload is already in progress")
    async with s.reload_lock:
        cfg = s.settings.cfg
        if body.run_dir:
            import copy

            cfg = copy.deepcopy(cfg)
            cfg.run.run_dir = body.run_dir
        model = body.model or (s.engine.model_name if s.engine is not None else s.settings.model)
        t0 = time.perf_counter()
        try:
            engine, lines = await asyncio.to_thread(s.load, cfg, model)
        except RecpipeError as e:
            s.metrics.reloads.labels("failed").inc()
            s.log(f"reload failed, still serving the previous run: {_one_line(e)}")
            raise RequestError(422, f"reload failed, still serving the previous run: {_one_line(e)}") from None
        s.engine, s.error = engine, None  # new requests go to it; admitted ones finish on the old one
        s.metrics.reloads.labels("ok").inc()
        s.log("reloaded: " + describe(engine, s.settings, s.api_key is not None))
        for line in lines:
            s.log(line)
        return {"reloaded": True, "seconds": round(time.perf_counter() - t0, 3), **engine.summary()}


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _print(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ guard
class _Guard:
    """Outermost ASGI middleware: API key, body-size cap, request metrics, and no traceback ever answered."""

    def __init__(self, app, settings: ServeSettings, state_box: dict):
        self.app = app
        self.settings = settings
        self.state_box = state_box

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        s: State | None = self.state_box.get("s")
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_status, s)
        except Exception as e:  # noqa: BLE001 - a bug: logged as one line, answered without a traceback
            if s is not None:
                s.log(f"{scope.get('path')}: internal error: {type(e).__name__}: {_one_line(e)}")
            status["code"] = 500
            try:
                await _error(500, "internal error; the server logged it")(scope, receive, send)
            except Exception:  # noqa: BLE001 - the response had already started; nothing more to send
                pass
        finally:
            if s is not None:
                route = scope.get("route")
                label = getattr(route, "path", None) or "unmatched"
                s.metrics.requests.labels(label, str(status["code"])).inc()
                s.metrics.latency.labels(label).observe(time.perf_counter() - t0)

    async def _guarded(self, scope, receive, send, s: State | None):
        path = scope.get("path", "")
        if s is not None and s.api_key is not None and path not in OPEN_PATHS and scope.get("method") != "OPTIONS":
            if not _key_ok(scope, s.api_key):
                return await _error(401, "missing or wrong API key (X-API-Key header)")(scope, receive, send)
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            cap = self.settings.max_body_bytes
            declared = _content_length(scope)
            if declared is not None and declared > cap:
                return await _error(413, f"request body over {cap:,} bytes")(scope, receive, send)
            body = bytearray()
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return  # the client went away before sending its request
                body += msg.get("body", b"")
                if len(body) > cap:
                    return await _error(413, f"request body over {cap:,} bytes")(scope, receive, send)
                if not msg.get("more_body"):
                    break
            receive = _replay(bytes(body), receive)
        await self.app(scope, receive, send)


def _key_ok(scope, key: str) -> bool:
    given = b""
    for name, value in scope.get("headers", ()):
        if name == b"x-api-key":
            given = value
        elif name == b"authorization" and value[:7].lower() == b"bearer ":
            given = value[7:].strip()
    return hmac.compare_digest(given, key.encode())


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect as the app would

    return replay


# ------------------------------------------------------------------------------------------------ server
def run(settings: ServeSettings) -> None:
    """Serve until SIGINT/SIGTERM. A run that fails to load is raised (the CLI prints `error: ...`, exit 2)."""
    import uvicorn

    if not (1 <= settings.port <= 65535):
        raise ConfigError(f"--port must be between 1 and 65535, got {settings.port}")
    if settings.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {settings.workers}")
    if not math.isfinite(settings.batch_window_ms) or settings.batch_window_ms < 0:
        raise ConfigError(f"--batch-window-ms must be >= 0, got {settings.batch_window_ms}")
    common = dict(host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False,
                  timeout_graceful_shutdown=10, limit_concurrency=2048, server_header=False)
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if settings.workers > 1:
            _run_workers(settings, common)
            return
        box: dict[str, Any] = {}
        app = create_app(settings, on_fatal=lambda: setattr(box["server"], "should_exit", True))
        server = box["server"] = uvicorn.Server(uvicorn.Config(app, **common))
        try:
            server.run()
        except SystemExit:  # uvicorn's way of saying it could not start (it logged why)
            raise ConfigError(f"could not listen on {settings.host}:{settings.port} (in use, or not allowed)") from None
        err = getattr(getattr(app.state, "recpipe", None), "error", None)
        if err is not None and getattr(app.state.recpipe, "engine", None) is None:
            raise err if isinstance(err, RecpipeError) else ConfigError(f"loading failed: {_one_line(err)}")
        if not server.started:
            raise ConfigError(f"could not listen on {settings.host}:{settings.port} (in use, or not allowed)")
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _run_workers(settings: ServeSettings, common: dict) -> None:
    import uvicorn

    with tempfile.NamedTemporaryFile("wb", suffix=".pkl", delete=False) as f:
        pickle.dump(settings, f)
    os.environ[SETTINGS_ENV] = f.name
    try:
        uvicorn.run("recpipe.serve.app:app_from_env", factory=True, workers=settings.workers, **common)
    finally:
        Path(f.name).unlink(missing_ok=True)


def app_from_env() -> FastAPI:
    """The app of one worker process (workers > 1): settings from the file the parent wrote."""
    with open(os.environ[SETTINGS_ENV], "rb") as f:
        settings = pickle.load(f)
    return create_app(settings)


