"""The untrusted host server: HTTP API, enclave pool, BackNet. It never holds a key or plaintext.

Endpoints (OpenAPI schema at ``/openapi.json``, docs at ``/docs``):

- ``GET /v1/attestation?nonce=HEX``: evidence from every enclave worker, each binding
  SHA-256(worker public key || nonce); the client verifies before it sends anything.
- ``POST /v1/provision``: the owner's model key, HPKE-sealed to one attested worker key
  (header ``X-Infenclave-Enclave-Key``). The host stores only the sealed blob it gets back.
- ``POST /v1/classify``: a request HPKE-sealed to one worker key (headers
  ``X-Infenclave-Enclave-Key``, ``X-Infenclave-Request-Id``, ``X-Infenclave-Model``);
  the answer is sealed to the client. Bodies are raw ``application/octet-stream``.
- ``GET /v1/model``: public facts of the served bundle (model id, cut points).
- ``GET /healthz``; ``GET /metrics`` (Prometheus text format).

Errors are JSON ``{"error": code, "detail": text}`` with codes a client can act on
(``unknown_enclave_key``, ``worker_lost``: attest again; ``not_provisioned``;
``enclave_refused``: opaque by design). Bodies are size-limited before they are read, and
every request has a deadline. TLS is optional: confidentiality rests on the end-to-end
encryption, TLS only hides metadata.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from infenclave.bundle import read_backnet, read_manifest, read_signature
from infenclave.crypto import HPKE_OVERHEAD
from infenclave.enclave.imaging import MAX_ENCODED_BYTES
from infenclave.errors import EnclaveError, InfenclaveError, ServerError, WorkerLost
from infenclave.host.backnet import BackNet, BackNetBatcher
from infenclave.host.channel import EnclaveRefused
from infenclave.host.enclave_pool import EnclavePool, NotProvisioned, UnknownEnclaveKey
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


def create_app(config: ServerConfig) -> FastAPI:
    """The FastAPI application; the enclave pool and BackNet start with it (lifespan)."""
    manifest = read_manifest(config.bundle_dir)
    signature = read_signature(config.bundle_dir)
    metrics = Metrics()
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        backnet = BackNet(read_backnet(config.bundle_dir, manifest), device=config.device,
                          threads=config.backnet_threads)
        batcher = BackNetBatcher(backnet, max_batch=config.max_batch, observe=metrics.observe_batch)
        batcher.start()
        pool = EnclavePool(bundle_dir=config.bundle_dir, manifest=manifest, state_dir=config.state_dir,
                           tee=config.tee, workers=config.workers, metrics=metrics,
                           enclave_threads=config.enclave_threads,
                           request_timeout=config.request_timeout,
                           gramine_dir=config.gramine_dir,
                           start_timeout=config.worker_start_timeout,
                           keyserver=config.keyserver,
                           remote_enclaves=config.remote_enclaves)
        await pool.start()
        state.update(pool=pool, batcher=batcher, backnet=backnet)
        logger.info("serving model %s (%s) with %d %s enclave worker(s), BackNet on %s",
                    manifest.model_id[:16], manifest.model.get("name"), config.workers,
                    config.tee, config.device)
        try:
            yield
        finally:
            await pool.stop()
            await batcher.stop()

    app = FastAPI(
        title="infenclave host",
        version="1",
        description="Untrusted relay for confidential classification: it sees ciphertext, "
        "IR1 and IR2 only.",
        lifespan=lifespan,
    )

    @app.exception_handler(_Error)
    async def _on_error(request: Request, exc: _Error) -> JSONResponse:
        metrics.count_request(_endpoint(request), exc.code)
        return JSONResponse({"error": exc.code, "detail": exc.detail}, status_code=exc.status)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness and readiness: workers up, workers holding the model key."""
        pool: EnclavePool = state["pool"]
        workers = pool.workers
        ready = sum(1 for w in workers if w.provisioned)
        return {
            "status": "ok" if ready else (
                "reprovision_needed" if pool.reprovision_needed and workers
                else "unprovisioned" if workers else "degraded"),
            "reprovision_needed": pool.reprovision_needed,
            "model_id": manifest.model_id,
            "tee": config.tee,
            "workers": len(workers),
            "workers_ready": ready,
            "worker_pids": {str(w.slot): w.process.pid for w in workers},
            "provisioned": pool.provisioned,
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
            "front_end": manifest.front_end.name,
            "tail_start": manifest.tail_start.name,
            "tee": config.tee,
        }

    @app.get(ATTESTATION_PATH)
    async def attestation(
        nonce: str = Query(..., min_length=32, max_length=128, pattern="^[0-9a-f]+$",
                           description="The client's fresh nonce, 16-64 bytes in lower-case hex."),
    ) -> dict[str, Any]:
        """Evidence from every enclave worker, each binding SHA-256(worker key || nonce)."""
        if len(nonce) % 2:
            raise _Error(422, "bad_nonce", "the nonce must be an even number of hex digits")
        pool: EnclavePool = state["pool"]
        started = time.perf_counter()
        found = await pool.evidence(bytes.fromhex(nonce))
        if not found:
            raise _Error(503, "no_enclave", "no enclave worker is available")
        metrics.observe_stage("attestation", time.perf_counter() - started)
        metrics.count_request("attestation", "ok")
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

    @app.post(PROVISION_PATH)
    async def provision(request: Request) -> dict[str, Any]:
        """The owner's model key, sealed to one attested worker (header names the key)."""
        pool: EnclavePool = state["pool"]
        key_id = _key_header(request)
        body = await _read_body(request, MAX_PROVISION_BODY)
        try:
            ready = await pool.provision(key_id, body)
        except UnknownEnclaveKey as exc:
            raise _Error(409, "unknown_enclave_key", str(exc)) from exc
        except EnclaveRefused as exc:
            known = {"already_provisioned": "this enclave already holds this model key",
                     "other_key_provisioned": "this enclave already holds a different model key"}
            if exc.code in known:
                raise _Error(409, exc.code, known[exc.code]) from exc
            raise _Error(400, "enclave_refused", "the enclave refused the model key") from exc
        except (EnclaveError, asyncio.TimeoutError) as exc:
            raise _Error(503, "worker_lost", "the enclave worker stopped during provisioning") from exc
        metrics.count_request("provision", "ok")
        logger.info("model key provisioned; %d worker(s) hold it", ready)
        return {"status": "provisioned", "workers_ready": ready}

    @app.post(CLASSIFY_PATH, response_class=Response,
              responses={200: {"content": {SEALED_MEDIA_TYPE: {}},
                               "description": "The answer, HPKE-sealed to the client."}})
    async def classify(request: Request) -> Response:
        """Relay one sealed request: enclave FrontNet, host BackNet, enclave Tail."""
        pool: EnclavePool = state["pool"]
        started = time.perf_counter()
        key_id = _key_header(request)
        request_id = request.headers.get(REQUEST_ID_HEADER, "")
        if REQUEST_ID_RE.fullmatch(request_id) is None:
            raise _Error(400, "bad_request", f"{REQUEST_ID_HEADER} must be 32 lower-case hex digits")
        if request.headers.get(MODEL_HEADER, manifest.model_id) != manifest.model_id:
            raise _Error(409, "wrong_model", "this server serves another model")
        body = await _read_body(request, MAX_CLASSIFY_BODY)
        try:
            sealed = await pool.classify(key_id, request_id, body, state["batcher"])
        except UnknownEnclaveKey as exc:
            raise _Error(409, "unknown_enclave_key", str(exc)) from exc
        except NotProvisioned as exc:
            raise _Error(409, "not_provisioned", str(exc)) from exc
        except WorkerLost as exc:
            raise _Error(503, "worker_lost", str(exc)) from exc
        except EnclaveRefused as exc:
            code = "not_provisioned" if exc.code == "not_provisioned" else "enclave_refused"
            raise _Error(409 if code == "not_provisioned" else 400, code,
                         "the enclave refused the request (it does not say why to the host)") from exc
        except ServerError as exc:
            raise _Error(503, "unavailable", str(exc)) from exc
        metrics.observe_stage("total", time.perf_counter() - started)
        metrics.count_request("classify", "ok")
        return Response(sealed, media_type=SEALED_MEDIA_TYPE)

    return app


def _endpoint(request: Request) -> str:
    path = request.url.path
    return path.rsplit("/", 1)[-1] or "root"


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


def run_server(config: ServerConfig, *, host: str, port: int, tls_cert: Path | None = None,
               tls_key: Path | None = None, log_level: str = "info") -> None:
    """Run the server with uvicorn until interrupted."""
    import uvicorn

    if (tls_cert is None) != (tls_key is None):
        raise InfenclaveError("give both --tls-cert and --tls-key, or neither")
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(config)
    uvicorn.run(app, host=host, port=port, log_level=log_level,
                ssl_certfile=str(tls_cert) if tls_cert else None,
                ssl_keyfile=str(tls_key) if tls_key else None,
                timeout_keep_alive=KEEP_ALIVE_S, limit_concurrency=MAX_CONNECTIONS)
