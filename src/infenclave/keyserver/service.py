"""The owner's attested key-release service (`infenclave keyserver BUNDLE.key --policy POLICY`).

Why: a replica that starts later (a new worker, fresh state, a machine whose sealed state no
longer opens, a confidential VM with no sealing key at all) needs the model key without the
owner at the keyboard. The owner runs this service where the key lives; it hands the key to
an enclave only after verifying that enclave's evidence, the way Azure Secure Key Release
and the Confidential Containers key broker do. Messages: `infenclave.protocol.keyrelease`.

Steps of a key request (each refusal is one opaque 403 outward; the audit log and the
service's log say which step):

K1. Rate limit: a token bucket per peer address (`RATE_BURST` requests, refilled at
    `RATE_PER_S`); beyond it 429, also logged.
K2. The model asked for is the one whose key this service holds.
K3. The nonce is one this service issued, to this peer, for this model, not expired
    (`NONCE_TTL_S`), and not used before: it is removed on first use, accepted or not.
K4. The evidence verifies with the client's verifier (`infenclave.attest.verify`) under the
    policy loaded by the client's loader (`infenclave.client.resolve_policy`, which also
    requires the policy to name the model), with the expected report data
    SHA-256(tag || enclave key || model id || nonce): wrong measurement, debug enclave,
    simulation not allowed or unknown signer, stale evidence, another key: refused.
K5. Release: the model key HPKE-sealed to the enclave key under
    `provision_context(model id)` (what an owner's `classify --provision` sends).

Every release and refusal is appended to the audit log as one JSON line: time, peer,
outcome, step, model id, the enclave key and the measurements of the evidence when they were
read. The log is opened in append mode for each line and never rewritten.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from infenclave.crypto import seal
from infenclave.errors import VerificationError
from infenclave.protocol.binding import expected_report_data
from infenclave.protocol.keyrelease import (
    CHALLENGE_PATH,
    KEY_PATH,
    MAX_KEY_REQUEST_BYTES,
    NONCE_BYTES,
    decode_challenge_request,
    decode_key_request,
    encode_challenge,
    encode_key_response,
)
from infenclave.protocol.messages import provision_context

__all__ = ["KeyServerConfig", "create_app", "run_keyserver"]

logger = logging.getLogger("infenclave.keyserver")

#: A nonce answers one key request within this many seconds (evidence takes < 1 s to make).
NONCE_TTL_S = 60.0
#: Nonces outstanding at once; the oldest is dropped beyond it (a peer cannot grow memory).
MAX_NONCES = 4096
#: Token bucket per peer: a burst of this many requests ...
RATE_BURST = 10
#: ... refilled at this many per second. A replica needs two requests per start.
RATE_PER_S = 1.0
_MAX_CHALLENGE_BYTES = 1024


@dataclass
class KeyServerConfig:
    """What `infenclave keyserver` configures; *clock* is a seam for tests (seconds)."""

    key_file: Path
    policy: Path
    allow_simulation: bool = False
    audit_log: Path | None = None
    nonce_ttl_s: float = NONCE_TTL_S
    rate_burst: int = RATE_BURST
    rate_per_s: float = RATE_PER_S
    clock: Callable[[], float] = field(default=time.time)


class _Refused(Exception):
    def __init__(self, step: str, claims: Any = None) -> None:
        super().__init__(step)
        self.step = step
        self.claims = claims


@dataclass
class _Bucket:
    tokens: float
    at: float


class _Audit:
    """Append-only JSON lines; a missing path logs to the service's log only."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._lock = threading.Lock()

    def record(self, **entry: Any) -> None:
        line = json.dumps(entry, sort_keys=True)
        logger.info("key release: %s", line)
        if self._path is None:
            return
        with self._lock:
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, (line + "\n").encode("utf-8"))
            finally:
                os.close(fd)


def create_app(config: KeyServerConfig) -> FastAPI:
    """The key-release app (module docstring); reads the key file and policy now."""
    from infenclave.attest import parse_evidence_envelope, verify
    from infenclave.bundle import read_key_file
    from infenclave.client import resolve_policy

    model_key = read_key_file(config.key_file)
    policy = resolve_policy(config.policy, allow_simulation=config.allow_simulation)
    audit = _Audit(config.audit_log)
    nonces: OrderedDict[bytes, tuple[str, str, float]] = OrderedDict()  # nonce -> peer, model, expiry
    buckets: dict[str, _Bucket] = {}
    lock = threading.Lock()
    app = FastAPI(title="infenclave key release", version="1", docs_url=None, redoc_url=None)

    def now_iso(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")

    def take_token(peer: str, t: float) -> bool:  # K1
        with lock:
            bucket = buckets.setdefault(peer, _Bucket(float(config.rate_burst), t))
            bucket.tokens = min(float(config.rate_burst), bucket.tokens + (t - bucket.at) * config.rate_per_s)
            bucket.at = t
            if bucket.tokens < 1.0:
                return False
            bucket.tokens -= 1.0
            return True

    def refuse(status: int, code: str) -> JSONResponse:
        return JSONResponse({"error": code}, status_code=status)

    async def body(request: Request, limit: int) -> bytes:
        data = b""
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise _Refused("K0 request body over its size limit")
        return data

    def rate_limited(peer: str, t: float) -> JSONResponse | None:
        """Step K1 for every endpoint: a 429 (audited) once the peer's token bucket is empty."""
        if take_token(peer, t):
            return None
        audit.record(
            time=now_iso(t),
            peer=peer,
            outcome="rate_limited",
            step="K1 rate limit",
            model_id=None,
            enclave_key=None,
            measurements=None,
        )
        return refuse(429, "rate_limited")

    @app.post(CHALLENGE_PATH)
    async def challenge(request: Request) -> JSONResponse:
        """Step 1: a fresh single-use nonce for this peer and model."""
        t, peer = config.clock(), _peer(request)
        if (limited := rate_limited(peer, t)) is not None:
            return limited
        try:
            model_id = decode_challenge_request(await body(request, _MAX_CHALLENGE_BYTES))
            if model_id != model_key.model_id:
                raise _Refused("K2 another model than the one whose key this service holds")
        except (VerificationError, _Refused) as exc:
            step = exc.step if isinstance(exc, _Refused) else f"K0 malformed challenge request ({exc})"
            audit.record(
                time=now_iso(t),
                peer=peer,
                outcome="refused",
                step=step,
                model_id=None,
                enclave_key=None,
                measurements=None,
            )
            return refuse(403, "refused")
        nonce = os.urandom(NONCE_BYTES)
        with lock:
            nonces[nonce] = (peer, model_id, t + config.nonce_ttl_s)
            while len(nonces) > MAX_NONCES:
                nonces.popitem(last=False)
        return JSONResponse(encode_challenge(nonce, int(config.nonce_ttl_s)))

    @app.post(KEY_PATH)
    async def key(request: Request) -> JSONResponse:
        """Steps 2-5: verify the enclave's evidence over the nonce; release the sealed key."""
        t, peer = config.clock(), _peer(request)
        if (limited := rate_limited(peer, t)) is not None:
            return limited
        entry: dict[str, Any] = {
            "time": now_iso(t),
            "peer": peer,
            "model_id": None,
            "enclave_key": None,
            "measurements": None,
            "tee": None,
        }
        try:
            try:
                model_id, nonce, public_key, envelope = decode_key_request(await body(request, MAX_KEY_REQUEST_BYTES))
            except VerificationError as exc:
                raise _Refused(f"K0 malformed key request ({exc})") from exc
            entry.update(model_id=model_id, enclave_key=public_key.hex())
            if model_id != model_key.model_id:  # K2
                raise _Refused("K2 another model than the one whose key this service holds")
            with lock:  # K3: single use, whatever follows
                issued = nonces.pop(nonce, None)
            if issued is None:
                raise _Refused("K3 unknown or already used nonce")
            if issued[0] != peer or issued[1] != model_id:
                raise _Refused("K3 the nonce was issued to another peer or for another model")
            if t > issued[2]:
                raise _Refused("K3 the nonce expired")
            try:  # K4
                evidence = parse_evidence_envelope(envelope)
                claims = verify(
                    evidence,
                    policy,
                    now=datetime.fromtimestamp(t, UTC),
                    expected_report_data=expected_report_data(public_key, nonce, model_id),
                )
            except VerificationError as exc:
                raise _Refused(f"K4 evidence refused: {exc}", getattr(exc, "claims", None)) from exc
            entry.update(measurements=dict(claims.measurements), tee=claims.tee)
            sealed = seal(public_key, model_key.key, context=provision_context(model_id))  # K5
        except _Refused as exc:
            if exc.claims is not None:
                entry.update(measurements=dict(exc.claims.measurements), tee=exc.claims.tee, debug=exc.claims.debug)
            audit.record(**entry, outcome="refused", step=exc.step)
            return refuse(403, "refused")
        audit.record(**entry, outcome="released", step="K5 released")
        return JSONResponse(encode_key_response(sealed))

    return app


def _peer(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


def run_keyserver(config: KeyServerConfig, *, host: str, port: int, log_level: str = "info") -> None:
    """Serve until interrupted (uvicorn)."""
    import uvicorn

    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    app = create_app(config)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
