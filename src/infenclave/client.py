"""The client SDK: attest the enclaves, provision the model key, classify images end to end.

    import infenclave
    client = infenclave.Client("http://127.0.0.1:8443", "model.policy.json")
    client.provision("model.key")            # the model owner, once
    for p in client.classify("cat.jpg", k=5):  # a path, or the encoded image's bytes
        print(p.label, p.prob)
    results = client.classify_batch(["a.jpg", "b.png"])  # one list of predictions per image

What it guarantees, in order:

1. `attest` sends a fresh 32-byte nonce and nothing else. For every enclave worker the server
   lists, it verifies the evidence against the policy (`infenclave.attest.verify`) and checks
   that the report data is SHA-256(that worker's public key || nonce). One failure refuses
   them all, with the verifier's reason: nothing is sent to an enclave that failed.
2. `provision` seals the owner's model key to one attested worker key, with the model id
   from the owner's key file as context: an enclave serving another model cannot open it.
3. `classify` seals {image, a one-time X25519 public key, k} to an attested worker key with
   context (model id, request id) and opens the answer with the one-time private key and
   context (model id, request id, "response"). The host relays ciphertext only.

A worker that restarted has a new key: the server answers ``unknown_enclave_key`` and the SDK
attests again (a full verification) and retries once. A request lost because its worker was
killed (``worker_lost``) is retried once on another attested worker: sealed again to that
worker's key under a fresh request id, never the same ciphertext; once fewer workers are
known than were attested, the SDK attests again to find their replacements. Nothing else is
retried: not a verification or policy failure, not a request the enclave refused, and not
one whose worker crashed or ran out of memory while holding it (``worker_crashed``: the
image may be the cause, and a retry would let it take down a second worker).

``allow_simulation=True`` accepts the ``sim`` backend (no hardware protection) when the
policy lists its measurement; it warns on every use, and never skips the measurement check.
"""

from __future__ import annotations

import base64
import itertools
import logging
import os
import secrets
import threading
import time
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from infenclave.crypto import generate_keypair, open_sealed, seal
from infenclave.enclave.topk import Prediction
from infenclave.errors import (
    BundleError,
    CryptoError,
    EnclaveError,
    ImageError,
    PolicyError,
    ServerError,
    UsageError,
    VerificationError,
    WorkerCrashed,
    WorkerLost,
)
from infenclave.protocol.http import (
    ATTESTATION_PATH,
    CLASSIFY_PATH,
    KEY_HEADER,
    MODEL_HEADER,
    MODEL_PATH,
    PROVISION_PATH,
    REQUEST_ID_HEADER,
)
from infenclave.protocol.messages import (
    encode_request,
    provision_context,
    request_context,
    response_context,
)
from infenclave.protocol.strict_json import loads_object

__all__ = ["AttestedEnclave", "Client", "SimulationWarning", "WorkerLost", "resolve_policy"]

logger = logging.getLogger("infenclave.client")

NONCE_BYTES = 32
#: Requests `classify_batch` keeps in flight at most (also bounded by the attested workers).
BATCH_CONCURRENCY = 8
#: What `Client.classify` takes: a path to an image file, or the encoded image's bytes.
ImageInput = str | os.PathLike[str] | bytes | bytearray | memoryview
#: Answers are a short JSON list sealed; a megabyte is far beyond any honest one.
MAX_RESPONSE_BYTES = 1024 * 1024
#: Seconds between attestations made to find the replacement of a lost worker.
REATTEST_INTERVAL_S = 1.0


class SimulationWarning(UserWarning):
    """Issued whenever a client accepts a simulated (unprotected) enclave."""


@dataclass(frozen=True)
class AttestedEnclave:
    """An enclave worker whose evidence passed the policy and binds `public_key`."""

    public_key: bytes
    claims: Any  # infenclave.attest.Claims
    provisioned: bool

    @property
    def key_id(self) -> str:
        """How the server names this worker."""
        return self.public_key.hex()


def resolve_policy(policy: Any, *, allow_simulation: bool) -> Any:
    """Turn a policy file path, mapping or `Policy` into the `Policy` this client enforces.

    *allow_simulation* sets only the policy's simulation switch (and adds ``simulated`` to
    the accepted TEE types when the policy lists a ``sim`` measurement); the measurement
    must still match. Without it, simulated evidence is refused by the verifier, and a
    policy that accepts nothing but a simulated TEE is refused here, before any request.
    """
    from infenclave.attest import Policy

    if isinstance(policy, Policy):
        document = policy.to_mapping()
    elif isinstance(policy, dict):
        document = dict(policy)
    else:
        from infenclave.attest import load_policy

        document = load_policy(Path(policy)).to_mapping()
    if not (document.get("model_ids") or document.get("model_signers")):
        raise PolicyError(
            "the policy names no model (model_ids or model_signers): a host could serve a "
            "bundle of its own and read your images; use the BUNDLE.policy.json that "
            "`infenclave partition` wrote"
        )
    if allow_simulation:
        document["allow_simulation"] = True
        sims = (document.get("measurements") or {}).get("sim")
        tee_types = list(document.get("tee_types") or [])
        if not sims:
            raise PolicyError("--allow-simulation: the policy lists no sim measurement to accept")
        if "simulated" not in tee_types:
            document["tee_types"] = [*tee_types, "simulated"]
        if not document.get("sim_signers"):
            warnings.warn(
                "the policy pins no sim_signers: simulated evidence signed by ANY key is accepted",
                SimulationWarning,
                stacklevel=3,
            )
        return Policy.from_mapping(document)
    parsed = Policy.from_mapping(document)
    if not parsed.unsafe_allows_simulation and set(parsed.tee_types) == {"simulated"}:
        # Refuse here, before any request: nothing this server can show would be accepted.
        raise VerificationError(
            "refused: the policy accepts only a simulated TEE, and simulation is not allowed "
            "(for development only: --allow-simulation)"
        )
    return parsed


class Client:
    """Confidential classification against one infenclave server (thread-safe)."""

    def __init__(
        self,
        url: str,
        policy: Any,
        allow_simulation: bool = False,
        *,
        timeout: float = 60.0,
        verify_tls: bool | str = True,
        model_id: str | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.allow_simulation = allow_simulation
        if allow_simulation:
            msg = "accepting a SIMULATED enclave: no hardware protection; for development only, never with real data"
            warnings.warn(msg, SimulationWarning, stacklevel=2)
        self.policy = resolve_policy(policy, allow_simulation=allow_simulation)
        self._http = http or httpx.Client(timeout=timeout, verify=verify_tls)
        self._owns_http = http is None
        self._expected_model_id = model_id
        self._lock = threading.Lock()
        self._enclaves: list[AttestedEnclave] = []
        self._cycle: Any = iter(())
        self.model_id: str | None = None
        self._attested_count = 0  # workers the last attestation listed
        self._attested_at = 0.0
        self._reattesting = False

    # --- context manager -------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP connection pool."""
        if self._owns_http:
            self._http.close()

    # --- attestation -------------------------------------------------------------------------

    @property
    def enclaves(self) -> list[AttestedEnclave]:
        """The enclave workers verified by the last `attest`."""
        with self._lock:
            return list(self._enclaves)

    def attest(self) -> list[AttestedEnclave]:
        """Fetch and verify evidence from every enclave worker; refuse all on any failure."""
        from infenclave.attest import verify
        from infenclave.attest.evidence import parse_attestation_answer
        from infenclave.protocol.binding import expected_report_data

        nonce = os.urandom(NONCE_BYTES)
        response = self._get(ATTESTATION_PATH, params={"nonce": nonce.hex()})
        answer = parse_attestation_answer(_json(response, "attestation"))
        model_id = answer.model_id
        if self._expected_model_id is not None and model_id != self._expected_model_id:
            raise VerificationError(
                f"the server serves model {model_id[:16]}..., not the expected {self._expected_model_id[:16]}..."
            )
        self._check_model(model_id)
        now = datetime.now(UTC)
        verified = []
        for index, entry in enumerate(answer.enclaves):
            try:
                claims = verify(
                    entry.evidence,
                    self.policy,
                    expected_report_data=expected_report_data(entry.public_key, nonce, model_id),
                    now=now,
                )
            except VerificationError as exc:
                raise VerificationError(f"enclave {index} refused: {exc}") from exc
            verified.append(AttestedEnclave(entry.public_key, claims, entry.provisioned))
        with self._lock:
            self._enclaves = verified
            self._cycle = _round_robin(verified)
            self.model_id = model_id
            self._attested_count = len(verified)
            self._attested_at = time.monotonic()
        return list(verified)

    def _check_model(self, model_id: str) -> None:
        """Refuse a model the policy does not name, before anything is sent.

        A listed model id is enough. Otherwise the server's manifest must hash to *model_id*
        and carry a valid signature by one of the policy's ``model_signers``. The evidence
        then binds *model_id* (`infenclave.protocol.binding`), so the enclave that answers is
        the one serving this model.
        """
        from infenclave.crypto import ed25519_verify
        from infenclave.protocol.bundle_format import model_id_of, parse_manifest

        if model_id in self.policy.model_ids:
            return
        refusal = f"the server serves model {model_id[:16]}..., which the policy does not name"
        if not self.policy.model_signers:
            raise VerificationError(refusal)
        document = _json(self._get(MODEL_PATH), "model")
        try:
            manifest_raw = base64.b64decode(str(document["manifest"]), validate=True)
            signature = base64.b64decode(str(document["signature"]), validate=True)
            manifest = parse_manifest(manifest_raw)
        except (KeyError, ValueError, BundleError) as exc:
            raise VerificationError(f"{refusal} (no readable signed manifest)") from exc
        if model_id_of(manifest_raw) != model_id or manifest.owner_key is None:
            raise VerificationError(f"{refusal} (its manifest is not the attested one, or unsigned)")
        if manifest.owner_key.hex() not in self.policy.model_signers:
            raise VerificationError(f"{refusal} (signed by an owner key the policy does not list)")
        try:
            ed25519_verify(manifest.owner_key, signature, manifest_raw)
        except CryptoError as exc:
            raise VerificationError(f"{refusal} (the owner's signature does not verify)") from exc

    def _next_enclave(self) -> tuple[AttestedEnclave, str]:
        with self._lock:
            # Workers were lost since the last attestation: one thread attests again (at most
            # once a second) to find their replacements; the others go on with those known.
            refresh = (
                bool(self._enclaves)
                and len(self._enclaves) < self._attested_count
                and not self._reattesting
                and time.monotonic() - self._attested_at >= REATTEST_INTERVAL_S
            )
            if self._enclaves and self.model_id is not None and not refresh:
                return next(self._cycle), self.model_id
            self._reattesting = True
        try:
            self.attest()
        finally:
            with self._lock:
                self._reattesting = False
        with self._lock:
            if not self._enclaves or self.model_id is None:
                raise VerificationError("no attested enclave")
            return next(self._cycle), self.model_id

    def _forget(self, enclave: AttestedEnclave) -> None:
        with self._lock:
            self._enclaves = [e for e in self._enclaves if e.public_key != enclave.public_key]
            self._cycle = _round_robin(self._enclaves)

    # --- provisioning ---------------------------------------------------------------------------

    def provision(self, key_file: Path | str) -> int:
        """Seal the owner's model key to an attested enclave; return how many workers hold it."""
        from infenclave.bundle import read_key_file

        model_key = read_key_file(Path(key_file))
        enclave, model_id = self._next_enclave()
        if model_id != model_key.model_id:
            raise UsageError(
                f"the key file is for model {model_key.model_id[:16]}..., but the server serves "
                f"{model_id[:16]}...: refusing to send the key"
            )
        sealed = seal(enclave.public_key, model_key.key, context=provision_context(model_key.model_id))
        response = self._post(PROVISION_PATH, sealed, {KEY_HEADER: enclave.key_id})
        if response.status_code == 409 and _error_code(response) == "already_provisioned":
            return sum(1 for e in self.attest() if e.provisioned)
        if response.status_code == 409 and _error_code(response) == "other_key_provisioned":
            raise UsageError(
                "the server's enclaves already hold a different model key than "
                f"{key_file}: refusing (restart the server with fresh state to change it)"
            )
        _raise_for(response, "provision")
        return int(_json(response, "provision").get("workers_ready", 0))

    # --- inference ---------------------------------------------------------------------------------

    def classify(self, image: ImageInput, k: int = 5) -> list[Prediction]:
        """Top-k predictions for one image, computed confidentially.

        *image* is a path (`str` or `os.PathLike`) to an image file, or the encoded image's
        bytes (JPEG, PNG, WebP). A file that cannot be read, or an image the enclave refuses,
        raises `ImageError` naming it.
        """
        image_bytes = _image_bytes(image)
        try:
            return self._classify_bytes(image_bytes, k)
        except ImageError as exc:
            if isinstance(image, (str, os.PathLike)):
                raise ImageError(f"{os.fspath(image)}: {exc}") from exc
            raise

    def classify_batch(
        self, images: Iterable[ImageInput], k: int = 5, *, return_image_errors: bool = False
    ) -> list[Any]:
        """`classify` for each image, several at a time; results in the order given.

        With *return_image_errors*, an image that cannot be read or that the enclave refuses
        gives its `ImageError` in its place instead of raising, and the others are still
        classified. Any other error (refused attestation, server unreachable) raises at once.
        """
        items = list(images)
        if not items:
            return []
        self._next_enclave()  # attest once, before the threads start
        width = max(1, min(len(items), len(self.enclaves), BATCH_CONCURRENCY))

        def one(item: ImageInput) -> list[Prediction] | ImageError:
            try:
                return self.classify(item, k)
            except ImageError as exc:
                if return_image_errors:
                    return exc
                raise

        with ThreadPoolExecutor(max_workers=width, thread_name_prefix="classify") as pool:
            return list(pool.map(one, items))

    def _classify_bytes(self, image_bytes: bytes, k: int) -> list[Prediction]:
        stale_retried = lost_retried = False
        while True:
            enclave, model_id = self._next_enclave()
            try:
                # Sealed afresh on every attempt: a new request id and one-time key.
                return self._classify_once(enclave, model_id, bytes(image_bytes), k)
            except _StaleEnclave:
                # The worker restarted before this request reached it: nothing was opened.
                # Attest again (full verification) and retry once.
                self._forget(enclave)
                if stale_retried:
                    raise EnclaveError("no attested enclave holds a key the server knows") from None
                stale_retried = True
                self.attest()
            except WorkerCrashed:
                raise
            except WorkerLost:
                # Killed from outside while it held this request: once more, on another
                # attested worker (the lost one is forgotten), sealed to that worker's key.
                if lost_retried:
                    raise
                lost_retried = True
                logger.info("worker lost mid-request; retrying once on another attested worker")

    def _classify_once(self, enclave: AttestedEnclave, model_id: str, image: bytes, k: int) -> list[Prediction]:
        request_id = os.urandom(16).hex()
        reply_private, reply_public = generate_keypair()
        sealed = seal(
            enclave.public_key, encode_request(image, reply_public, k), context=request_context(model_id, request_id)
        )
        response = self._post(
            CLASSIFY_PATH, sealed, {KEY_HEADER: enclave.key_id, REQUEST_ID_HEADER: request_id, MODEL_HEADER: model_id}
        )
        if response.status_code == 409 and _error_code(response) == "unknown_enclave_key":
            raise _StaleEnclave()
        if response.status_code == 503 and _error_code(response) == "worker_lost":
            self._forget(enclave)
            raise WorkerLost(
                "the enclave worker handling this request stopped before answering; the next call attests again"
            )
        if response.status_code == 503 and _error_code(response) == "worker_crashed":
            self._forget(enclave)
            raise WorkerCrashed(
                "the enclave worker crashed or ran out of memory while it held this "
                "request (the image may be the cause); not retried"
            )
        _raise_for(response, "classify")
        if len(response.content) > MAX_RESPONSE_BYTES:
            raise ServerError("the answer is larger than any honest answer")
        try:
            plaintext = open_sealed(reply_private, response.content, context=response_context(model_id, request_id))
        except CryptoError as exc:
            raise VerificationError("the answer was not sealed by the attested enclave for this request") from exc
        answer = loads_object(plaintext, "the enclave's answer", VerificationError)
        if "error" in answer:
            raise ImageError(str(answer["error"]))
        try:
            return [Prediction(int(p["index"]), str(p["label"]), float(p["prob"])) for p in answer["predictions"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise VerificationError("the enclave's answer is malformed") from exc

    # --- HTTP helpers -------------------------------------------------------------------------------

    def _post(self, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        try:
            return self._http.post(
                self.url + path, content=body, headers={**headers, "Content-Type": "application/octet-stream"}
            )
        except httpx.HTTPError as exc:
            raise ServerError(f"cannot reach {self.url}: {exc}") from exc

    def _get(self, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.get(self.url + path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServerError(f"cannot reach {self.url}: {exc}") from exc
        _raise_for(response, path.rsplit("/", 1)[-1])
        return response


class _StaleEnclave(Exception):
    pass


def _round_robin(enclaves: list[AttestedEnclave]) -> Any:
    """Cycle over *enclaves* from a random one: clients that attested at the same moment
    would otherwise all start on the first worker and stay in step (measured: 32 soak clients
    moved between the two workers as one herd, and one kill caught every request)."""
    if not enclaves:
        return iter(())
    start = secrets.randbelow(len(enclaves))
    return itertools.cycle(enclaves[start:] + enclaves[:start])


def _image_bytes(image: ImageInput) -> bytes:
    """The encoded image: read from a path (size-limited), or given as bytes."""
    if isinstance(image, (str, os.PathLike)):
        from infenclave.enclave.imaging import MAX_ENCODED_BYTES  # what an enclave accepts
        from infenclave.protocol.files import read_bounded

        data = read_bounded(Path(image), MAX_ENCODED_BYTES, "image file", ImageError)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    else:
        raise UsageError(f"an image is a path or bytes, not {type(image).__name__}")
    if not data:
        raise ImageError(f"{image} is empty" if isinstance(image, (str, os.PathLike)) else "the image is empty")
    return data


def _error_code(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", ""))
    except (ValueError, AttributeError):
        return ""


def _raise_for(response: httpx.Response, what: str) -> None:
    if response.is_success:
        return
    try:
        doc = response.json()
        detail = f"{doc.get('error')}: {doc.get('detail')}"
    except (ValueError, AttributeError):
        detail = response.text[:200]
    raise ServerError(f"{what}: the server answered {response.status_code} ({detail})")


def _json(response: httpx.Response, what: str) -> dict[str, Any]:
    """The server's answer as a JSON object, read strictly (duplicate keys refused)."""
    return loads_object(response.content, f"{what}: the server's answer", ServerError)
