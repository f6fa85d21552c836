"""The untrusted host server: HTTP API, enclave pool, BackNet. It never holds a key or plaintext.

Endpoints (OpenAPI schema at ``/openapi.json``, docs at ``/docs``):

- ``GET /v1/attestation?nonce=HEX``: evidence from every enclave worker, each binding
  SHA-256(worker public key || nonce); the client verifies before it sends anything.
- ``POST /v1/provision``: the owner's model key, HPKE-sealed to one attested worker key
  (header ``X-Infenclave-Enclave-Key``). The host stores only the sealed blob it gets back.
- ``POST /v1/classify``: a request HPKE-sealed to one worker key (headers
  ``X-Infenclave-Enclave-Key``, ``X-Infenclave-Request-Id``, ``X-Infenclave-Model``);
  the answer is sealed to the client. Bodies are raw ``application/octet-stream``.
- ``GET /v1/model``: public facts of the served bundle (model id, deployment, cut points).
- ``GET /healthz``; ``GET /metrics`` (Prometheus text format).

Errors are JSON ``{"error": code, "detail": text}`` with codes a client can act on
(``unknown_enclave_key``, ``worker_lost``: attest again; ``not_provisioned``;
``enclave_refused``: opaque by design). Bodies are size-limited before they are read, and
every request has a deadline. TLS is optional: confidentiality rests on the end-to-end
encryption, TLS only hides metadata.

A whole-model bundle (``deployment`` ``whole-model-in-enclave``) has no BackNet: none is
loaded, the enclave answers each request itself, and /metrics counts no BackNet batch.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from infenclave import __version__
from infenclave.bundle import read_backnet, read_manifest, read_signature
from infenclave.crypto import HPKE_OVERHEAD
from infenclave.enclave.imaging import MAX_ENCODED_BYTES
from infenclave.errors import EnclaveError, ServerError, UsageError, WorkerCrashed, WorkerLost
from infenclave.host.backnet import BackNet, BackNetBatcher
from infenclave.host.channel import EnclaveRefused
from infenclave.host.enclave_pool import EnclavePool, NotProvisioned, UnknownEnclaveKey
from infenclave.host.limits import HEADER_TIMEOUT_S, with_header_timeout
from infenclave.host.metrics import Metrics
from infenclave.protocol.envelope import encode_envelope
from infenclave.protocol.http import (
    ATTESTATION_PATH,
    CLASSIFY_PATH,
    KEY_HEADER,
    MAX_PROVISION_BODY,
    MODEL_HEADER,
    MODEL_PATH,
    PROVISION_PATH,
    REQUEST_ID_HEADER,
    SEALED_MEDIA_TYPE,
)
from infenclave.protocol.messages import REQUEST_ID_RE

__all__ = ["ServerConfig", "create_app", "run_server"]

logger = logging.getLogger("infenclave.host")

#: A sealed request is an image (at most MAX_ENCODED_BYTES), a 40-byte head and HPKE overhead.
MAX_CLASSIFY_BODY = MAX_ENCODED_BYTES + 64 + HPKE_OVERHEAD
_HEX_KEY = re.compile(r"[0-9a-f]{64}")


#: A 24-megapixel camera's photo (6000x4000). An 8000x8000 RGBA PNG (64 M pixels, the
#: enclave's own cap) is a 260 KiB file that takes 1.35 GB to decode; at this cap ~0.5 GB.
DEFAULT_MAX_PIXELS = 24_000_000
#: A Lite0 worker serves in ~0.3 GB; this leaves room for the largest image under the cap.
DEFAULT_WORKER_MEMORY = 1536 * 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    """Everything `infenclave serve` configures."""

    bundle_dir: Path
    state_dir: Path
    tee: str = "sim"
    workers: int = 2
    device: str = "cpu"
    enclave_threads: int = 1
    backnet_threads: int = 0
    max_batch: int = 32
    request_timeout: float = 60.0
    gramine_dir: Path | None = None
    #: Seconds a worker may take to start (None: 60 under sim, 300 under gramine-sgx).
    worker_start_timeout: float | None = None
    #: URL of the owner's key-release service: unprovisioned workers get the key from it.
    keyserver: str | None = None
    #: Enclaves elsewhere (``--enclave HOST:PORT``), served besides the local workers.
    remote_enclaves: tuple[str, ...] = ()
    #: Pixel cap the enclave applies from an image's header, before decoding; it can only
    #: lower the enclave's own `imaging.MAX_PIXELS`. None: the enclave's own.
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    #: Bytes of memory per enclave worker (`host.cgroup`); None: no limit.
    worker_memory: int | None = DEFAULT_WORKER_MEMORY
    #: Seconds a client has to send a request head (`host.limits`).
    header_timeout: float = HEADER_TIMEOUT_S


OCTET_STREAM = "application/octet-stream"
#: Seconds an idle keep-alive connection is held (uvicorn's default is 5; 30 let idle
#: connections pile up towards `MAX_CONNECTIONS`).
KEEP_ALIVE_S = 5
#: Connections and tasks served at once; beyond it uvicorn answers 503 at once.
MAX_CONNECTIONS = 1024


class _Error(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def create_app(
    config: ServerConfig, *, backend: Callable[[], AbstractAsyncContextManager[Any]] | None = None
) -> FastAPI:
    """The FastAPI application; the enclave pool and BackNet start with it (lifespan).

    *backend*, when given, replaces the local enclave pool and BackNet: a context manager
    yielding (pool, batcher) with their interface, for enclaves and a BackNet that run
    elsewhere (`host.ray_serve`). The HTTP API, its checks and its error mapping stay these.
    """
    manifest = read_manifest(config.bundle_dir)
    signature = read_signature(config.bundle_dir)
    metrics = Metrics()
    metrics.set_info(version=__version__, model_id=manifest.model_id, tee=config.tee, deployment=manifest.deployment)
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if backend is not None:
            async with backend() as (remote_pool, remote_batcher):
                state.update(pool=remote_pool, batcher=remote_batcher)
                yield
            return
        backnet: BackNet | None = None
        batcher: BackNetBatcher | None = None
        if not manifest.whole_model:  # a whole-model bundle has nothing for the host to run
            backnet = BackNet(
                read_backnet(config.bundle_dir, manifest), device=config.device, threads=config.backnet_threads
            )
            batcher = BackNetBatcher(backnet, max_batch=config.max_batch, observe=metrics.observe_batch)
            batcher.start()
        pool = EnclavePool(
            bundle_dir=config.bundle_dir,
            manifest=manifest,
            state_dir=config.state_dir,
            tee=config.tee,
            workers=config.workers,
            metrics=metrics,
            enclave_threads=config.enclave_threads,
            request_timeout=config.request_timeout,
            gramine_dir=config.gramine_dir,
            start_timeout=config.worker_start_timeout,
            keyserver=config.keyserver,
            remote_enclaves=config.remote_enclaves,
            memory_limit=config.worker_memory,
            max_pixels=config.max_pixels,
        )
        await pool.start()
        state.update(pool=pool, batcher=batcher, backnet=backnet)
        logger.info(
            "serving model %s (%s) with %d %s enclave worker(s), %s",
            manifest.model_id[:16],
            manifest.model.get("name"),
            config.workers,
            config.tee,
            "the whole model in the enclave (no BackNet)" if batcher is None else f"BackNet on {config.device}",
        )
        try:
            yield
        finally:
            await pool.stop()
            if batcher is not None:
                await batcher.stop()

    app = FastAPI(
        title="infenclave host",
        version="1",
        description="Untrusted relay for confidential classification: it sees ciphertext, IR1 and IR2 only.",
        lifespan=lifespan,
    )
    app.add_middleware(_ObserveRequests, metrics=metrics)

    @app.exception_handler(_Error)
    async def _on_error(request: Request, exc: _Error) -> JSONResponse:
        request.state.outcome = exc.code  # for the metrics: the error code, not just the status
        return JSONResponse({"error": exc.code, "detail": exc.detail}, status_code=exc.status)

    @app.get("/livez")
    @app.get("/v2/health/live")
    async def livez() -> dict[str, Any]:
        """Liveness: the process answers (it restarts dead workers itself). Always 200."""
        return {"live": True}

    @app.get("/readyz", responses={503: {"description": "No worker can serve yet."}})
    @app.get("/v2/health/ready", responses={503: {"description": "No worker can serve yet."}})
    async def readyz() -> JSONResponse:
        """Readiness: 200 when at least one enclave worker holds the model key and can serve a
        classification, else 503 (workers starting, not provisioned, or the stored sealed key
        no longer opens: ``reprovision_needed``, the owner must provision again)."""
        pool: EnclavePool = state["pool"]
        ready = sum(1 for w in pool.workers if w.provisioned)
        doc = {
            "ready": ready > 0,
            "workers": len(pool.workers),
            "workers_ready": ready,
            "provisioned": pool.provisioned,
            "reprovision_needed": pool.reprovision_needed,
            "deployment": manifest.deployment,
        }
        return JSONResponse(doc, status_code=200 if ready else 503)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Status report (always 200 while the process answers; not a readiness probe: use
        ``/readyz``): workers up, workers holding the model key, state problems."""
        pool: EnclavePool = state["pool"]
        workers = pool.workers
        ready = sum(1 for w in workers if w.provisioned)
        return {
            "status": "ok"
            if ready
            else (
                "reprovision_needed"
                if pool.reprovision_needed and workers
                else "unprovisioned"
                if workers
                else "degraded"
            ),
            "reprovision_needed": pool.reprovision_needed,
            "state_error": pool.state_error,
            "model_id": manifest.model_id,
            "tee": config.tee,
            "workers": len(workers),
            "workers_ready": ready,
            "worker_pids": {str(w.slot): w.process.pid for w in workers},
            "provisioned": pool.provisioned,
            "deployment": manifest.deployment,
            "backnet": None if state["batcher"] is None else config.device,
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        """Prometheus text format: requests, errors, per-stage latency histograms."""
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get(MODEL_PATH)
    async def model() -> dict[str, Any]:
        """Public facts of the served bundle (no label names: those are in the sealed Tail).

        ``manifest`` (its exact bytes) and ``signature`` (the owner's, over those bytes) let a
        client whose policy names owner keys rather than model ids check the model itself.
        """
        return {
            "model_id": manifest.model_id,
            "manifest": base64.b64encode(manifest.raw).decode("ascii"),
            "signature": None if signature is None else base64.b64encode(signature).decode("ascii"),
            "model": manifest.model,
            "num_classes": manifest.num_classes,
            "deployment": manifest.deployment,
            "front_end": None if manifest.front_end is None else manifest.front_end.name,
            "tail_start": None if manifest.tail_start is None else manifest.tail_start.name,
            "tee": config.tee,
        }

    @app.get(ATTESTATION_PATH)
    async def attestation(
        nonce: str = Query(
            ...,
            min_length=32,
            max_length=128,
            pattern="^[0-9a-f]+$",
            description="The client's fresh nonce, 16-64 bytes in lower-case hex.",
        ),
    ) -> dict[str, Any]:
        """Evidence from every enclave worker, each binding SHA-256(worker key || nonce)."""
        if len(nonce) % 2:
            raise _Error(422, "bad_nonce", "the nonce must be an even number of hex digits")
        pool: EnclavePool = state["pool"]
        found = await pool.evidence(bytes.fromhex(nonce))
        if not found:
            raise _Error(503, "no_enclave", "no enclave worker is available")
        return {
            "model_id": manifest.model_id,
            "enclaves": [
                {
                    "key_id": worker.key_id,
                    "public_key": worker.public_key.hex(),
                    "provisioned": worker.provisioned,
                    "evidence": encode_envelope(tee, raw, certificates=certificates).decode("utf-8"),
                }
                for worker, tee, raw, certificates in found
            ],
        }

    @app.post(
        PROVISION_PATH,
        openapi_extra=_sealed_operation(
            "The owner's 32-byte model key, HPKE-sealed to the worker named in the header "
            "(context: provision_context(model id); docs/protocol.md).",
            MAX_PROVISION_BODY,
            request_id=False,
        ),
    )
    async def provision(request: Request) -> dict[str, Any]:
        """The owner's model key, sealed to one attested worker (header names the key)."""
        pool: EnclavePool = state["pool"]
        key_id = _key_header(request)
        body = await _read_body(request, MAX_PROVISION_BODY)
        try:
            ready = await pool.provision(key_id, body)
        except _POOL_ERRORS as exc:
            raise _pool_error(exc, "the model key") from exc
        logger.info("model key provisioned; %d worker(s) hold it", ready)
        return {"status": "provisioned", "workers_ready": ready}

    @app.post(
        CLASSIFY_PATH,
        response_class=Response,
        responses={
            200: {
                "content": {SEALED_MEDIA_TYPE: {"schema": _BINARY}},
                "description": "The answer, HPKE-sealed to the client's one-time "
                "key (context: response_context(model id, request id)).",
            }
        },
        openapi_extra=_sealed_operation(
            "The request plaintext (k, the client's one-time X25519 key, the encoded "
            "image), HPKE-sealed to the worker named in the header (context: "
            "request_context(model id, request id); docs/protocol.md).",
            MAX_CLASSIFY_BODY,
            request_id=True,
        ),
    )
    async def classify(request: Request) -> Response:
        """Relay one sealed request: enclave FrontNet, host BackNet, enclave Tail."""
        pool: EnclavePool = state["pool"]
        key_id = _key_header(request)
        request_id = request.headers.get(REQUEST_ID_HEADER, "")
        if REQUEST_ID_RE.fullmatch(request_id) is None:
            raise _Error(400, "bad_request", f"{REQUEST_ID_HEADER} must be 32 lower-case hex digits")
        if request.headers.get(MODEL_HEADER, manifest.model_id) != manifest.model_id:
            raise _Error(409, "wrong_model", "this server serves another model")
        body = await _read_body(request, MAX_CLASSIFY_BODY)
        try:
            sealed = await pool.classify(key_id, request_id, body, state["batcher"])
        except _POOL_ERRORS as exc:
            raise _pool_error(exc, "the request") from exc
        return Response(sealed, media_type=SEALED_MEDIA_TYPE)

    return app


_BINARY = {"type": "string", "format": "binary"}
_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error", "detail"],
    "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
}


def _sealed_operation(body: str, limit: int, *, request_id: bool) -> dict[str, Any]:
    """OpenAPI for a sealed POST: its raw body, its headers, its JSON errors.

    The handlers read the body and headers themselves (size-limited, checked before an
    enclave sees them), so FastAPI cannot infer them: they are declared here.
    """
    hex_key = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
    headers = [
        {
            "name": KEY_HEADER,
            "in": "header",
            "required": True,
            "schema": hex_key,
            "description": "The attested worker the body is sealed to: the hex of its "
            "X25519 public key (key_id in /v1/attestation).",
        }
    ]
    if request_id:
        headers += [
            {
                "name": REQUEST_ID_HEADER,
                "in": "header",
                "required": True,
                "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                "description": "The client's fresh request id, also in the HPKE context.",
            },
            {
                "name": MODEL_HEADER,
                "in": "header",
                "required": False,
                "schema": hex_key,
                "description": "The model id the client attested; another is refused (409).",
            },
        ]
    error = {"content": {"application/json": {"schema": _ERROR_SCHEMA}}}
    return {
        "parameters": headers,
        "requestBody": {
            "required": True,
            "description": body,
            "content": {SEALED_MEDIA_TYPE: {"schema": {**_BINARY, "maxLength": limit}}},
        },
        "responses": {
            "400": {"description": "bad_request or enclave_refused", **error},
            "409": {
                "description": "unknown_enclave_key (attest again), not_provisioned, "
                "wrong_model, already_provisioned, other_key_provisioned",
                **error,
            },
            "413": {"description": "too_large", **error},
            "415": {"description": "unsupported_media_type", **error},
            "503": {"description": "worker_lost or worker_crashed (attest again, retry), unavailable", **error},
        },
    }


#: What the enclave pool raises on purpose; `_pool_error` maps each to one HTTP answer.
_POOL_ERRORS = (UnknownEnclaveKey, NotProvisioned, EnclaveRefused, EnclaveError, ServerError, asyncio.TimeoutError)
#: Refusals an enclave names to the host, because the client can act on them.
_NAMED_REFUSALS = {
    "already_provisioned": (409, "this enclave already holds this model key"),
    "other_key_provisioned": (409, "this enclave already holds a different model key"),
    "not_provisioned": (409, "this enclave does not hold the model key yet"),
}


def _pool_error(exc: BaseException, what: str) -> _Error:
    """The one mapping from an enclave-pool failure to the HTTP error a client can act on.

    *what* names what the enclave refused ("the model key", "the request"); any other
    refusal stays opaque by design.
    """
    if isinstance(exc, UnknownEnclaveKey):
        return _Error(409, "unknown_enclave_key", str(exc))
    if isinstance(exc, NotProvisioned):
        return _Error(409, "not_provisioned", str(exc))
    if isinstance(exc, EnclaveRefused):
        if exc.code in _NAMED_REFUSALS:
            status, detail = _NAMED_REFUSALS[exc.code]
            return _Error(status, exc.code, detail)
        return _Error(400, "enclave_refused", f"the enclave refused {what} (it does not say why to the host)")
    if isinstance(exc, WorkerCrashed):
        return _Error(503, "worker_crashed", str(exc))
    if isinstance(exc, (WorkerLost, EnclaveError, asyncio.TimeoutError)):
        return _Error(503, "worker_lost", str(exc) or "the enclave worker stopped before answering")
    return _Error(503, "unavailable", str(exc))


def _endpoint(scope: dict[str, Any]) -> str:
    """The metrics label of a request: its route's last segment, ``other`` for no route."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path.rsplit("/", 1)[-1] if isinstance(path, str) else "other"


class _ObserveRequests:
    """ASGI middleware: in-flight gauge, and every request counted with its status code."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_observed(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        started = time.perf_counter()
        self.metrics.request_started()
        try:
            await self.app(scope, receive, send_observed)
        finally:
            outcome = scope.get("state", {}).get("outcome") or ("ok" if status < 400 else "error")
            self.metrics.request_finished(_endpoint(scope), outcome, status, time.perf_counter() - started)


def _key_header(request: Request) -> str:
    key_id = request.headers.get(KEY_HEADER, "")
    if _HEX_KEY.fullmatch(key_id) is None:
        raise _Error(400, "bad_request", f"{KEY_HEADER} must name an enclave key (64 hex digits)")
    return key_id


async def _read_body(request: Request, limit: int) -> bytes:
    """Read the body, refusing it as soon as it is known to exceed *limit* bytes.

    The body must be ``application/octet-stream``; a request without Content-Type is read as
    that (RFC 9110 section 8.3), one that declares another type is refused (415).
    """
    media_type = request.headers.get("content-type", OCTET_STREAM).split(";", 1)[0].strip().lower()
    if media_type != OCTET_STREAM:
        raise _Error(415, "unsupported_media_type", f"the body must be {OCTET_STREAM}")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise _Error(400, "bad_request", "bad Content-Length")
        if int(declared) > limit:
            raise _Error(413, "too_large", f"the body is over the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _Error(413, "too_large", f"the body is over the {limit}-byte limit")
        chunks.append(chunk)
    if not size:
        raise _Error(400, "bad_request", "empty body")
    return b"".join(chunks)


def run_server(
    config: ServerConfig,
    *,
    host: str,
    port: int,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    log_level: str = "info",
    log_format: str = "text",
) -> None:
    """Run the server with uvicorn until interrupted.

    The port is bound first, before any enclave worker starts: a port in use is one clear
    error, not a failure after the workers came up.
    """
    import uvicorn

    from infenclave.host.logs import configure_logging

    if (tls_cert is None) != (tls_key is None):
        raise UsageError("give both --tls-cert and --tls-key, or neither")
    listener = _listen(host, port)
    configure_logging(log_level, log_format)
    app = create_app(config)
    server_config = uvicorn.Config(
        app,
        log_level=log_level,
        log_config=None,
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
        timeout_keep_alive=KEEP_ALIVE_S,
        limit_concurrency=MAX_CONNECTIONS,
        http=with_header_timeout(config.header_timeout),
    )
    with listener:
        uvicorn.Server(server_config).run(sockets=[listener])


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on *host*:*port*, or a `UsageError` saying why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host.strip("[]"), port), family=family, backlog=2048)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise UsageError(f"cannot listen on {host}:{port}: {reason}") from exc
