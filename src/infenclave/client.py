"""The client SDK: attest the enclaves, provision the model key, classify images end to end.

    import infenclave
    client = infenclave.Client("http://127.0.0.1:8443", "model.policy.json")
    client.provision("model.key")            # the model owner, once
    for p in client.classify(open("cat.jpg", "rb").read(), k=5):
        print(p.label, p.prob)

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
attests again (a full verification) and retries once; a worker that died while handling a
request fails that request with `WorkerLost`, and the next call re-attests.

``allow_simulation=True`` accepts the ``sim`` backend (no hardware protection) when the
policy lists its measurement; it warns on every use, and never skips the measurement check.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import os
import threading
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
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

__all__ = ["AttestedEnclave", "Client", "SimulationWarning", "WorkerLost", "resolve_policy"]

logger = logging.getLogger("infenclave.client")

NONCE_BYTES = 32
#: Answers are a short JSON list sealed; a megabyte is far beyond any honest one.
MAX_RESPONSE_BYTES = 1024 * 1024


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
            warnings.warn("the policy pins no sim_signers: simulated evidence signed by ANY key "
                          "is accepted", SimulationWarning, stacklevel=3)
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
            msg = ("accepting a SIMULATED enclave: no hardware protection; for development "
                   "only, never with real data")
            warnings.warn(msg, SimulationWarning, stacklevel=2)
        self.policy = resolve_policy(policy, allow_simulation=allow_simulation)
        self._http = http or httpx.Client(timeout=timeout, verify=verify_tls)
        self._owns_http = http is None
        self._expected_model_id = model_id
        self._lock = threading.Lock()
        self._enclaves: list[AttestedEnclave] = []
        self._cycle: Any = iter(())
        self.model_id: str | None = None

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
        from infenclave.attest import parse_evidence_envelope, verify
        from infenclave.protocol.binding import expected_report_data

        nonce = os.urandom(NONCE_BYTES)
        response = self._get(ATTESTATION_PATH, params={"nonce": nonce.hex()})
        document = _json(response, "attestation")
        model_id = document.get("model_id")
        enclaves_doc = document.get("enclaves")
        if not isinstance(model_id, str) or not isinstance(enclaves_doc, list) or not enclaves_doc:
            raise VerificationError("the server's attestation answer is malformed or lists no enclave")
        if self._expected_model_id is not None and model_id != self._expected_model_id:
            raise VerificationError(
                f"the server serves model {model_id[:16]}..., not the expected {self._expected_model_id[:16]}..."
            )
        self._check_model(model_id)
        now = datetime.now(timezone.utc)
        verified = []
        for index, entry in enumerate(enclaves_doc):
            try:
                public_key = bytes.fromhex(entry["public_key"])
                if entry.get("key_id") != public_key.hex() or len(public_key) != 32:
                    raise ValueError("key id")
                evidence = parse_evidence_envelope(str(entry["evidence"]).encode("utf-8"))
            except (KeyError, TypeError, ValueError) as exc:
                raise VerificationError(f"enclave {index}: malformed attestation entry") from exc
            try:
                claims = verify(evidence, self.policy,
                                expected_report_data=expected_report_data(public_key, nonce, model_id),
                                now=now)
            except VerificationError as exc:
                raise VerificationError(f"enclave {index} refused: {exc}") from exc
            verified.append(AttestedEnclave(public_key, claims, bool(entry.get("provisioned"))))
        with self._lock:
            self._enclaves = verified
            self._cycle = itertools.cycle(verified)
            self.model_id = model_id
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
            if self._enclaves and self.model_id is not None:
                return next(self._cycle), self.model_id
        self.attest()
        with self._lock:
            if not self._enclaves or self.model_id is None:
                raise VerificationError("no attested enclave")
            return next(self._cycle), self.model_id

    def _forget(self, enclave: AttestedEnclave) -> None:
        with self._lock:
            self._enclaves = [e for e in self._enclaves if e.public_key != enclave.public_key]
            self._cycle = itertools.cycle(self._enclaves) if self._enclaves else iter(())

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
            raise UsageError("the server's enclaves already hold a different model key than "
                             f"{key_file}: refusing (restart the server with fresh state to change it)")
        _raise_for(response, "provision")
        return int(_json(response, "provision").get("workers_ready", 0))

    # --- inference ---------------------------------------------------------------------------------

    def classify(self, image_bytes: bytes, k: int = 5) -> list[Prediction]:
        """Top-k predictions for one encoded image, computed confidentially."""
        if not isinstance(image_bytes, (bytes, bytearray)) or not image_bytes:
            raise ImageError("the image is empty")
        for attempt in range(2):
            enclave, model_id = self._next_enclave()
            try:
                return self._classify_once(enclave, model_id, bytes(image_bytes), k)
            except _StaleEnclave:
                # The worker restarted before this request reached it: nothing was opened.
                # Attest again (full verification) and retry once.
                self._forget(enclave)
                if attempt == 1:
                    raise EnclaveError("no attested enclave holds a key the server knows") from None
                self.attest()
        raise EnclaveError("unreachable")  # pragma: no cover

    def _classify_once(self, enclave: AttestedEnclave, model_id: str, image: bytes, k: int) -> list[Prediction]:
        request_id = os.urandom(16).hex()
        reply_private, reply_public = generate_keypair()
        sealed = seal(enclave.public_key, encode_request(image, reply_public, k),
                      context=request_context(model_id, request_id))
        response = self._post(CLASSIFY_PATH, sealed, {
            KEY_HEADER: enclave.key_id, REQUEST_ID_HEADER: request_id, MODEL_HEADER: model_id})
        if response.status_code == 409 and _error_code(response) == "unknown_enclave_key":
            raise _StaleEnclave()
        if response.status_code == 503 and _error_code(response) == "worker_lost":
            self._forget(enclave)
            raise WorkerLost("the enclave worker handling this request stopped before answering; "
                             "the next call attests again")
        _raise_for(response, "classify")
        if len(response.content) > MAX_RESPONSE_BYTES:
            raise ServerError("the answer is larger than any honest answer")
        try:
            plaintext = open_sealed(reply_private, response.content,
                                    context=response_context(model_id, request_id))
        except CryptoError as exc:
            raise VerificationError("the answer was not sealed by the attested enclave for this request") from exc
        answer = json.loads(plaintext.decode("utf-8"))
        if "error" in answer:
            raise ImageError(str(answer["error"]))
        return [Prediction(int(p["index"]), str(p["label"]), float(p["prob"])) for p in answer["predictions"]]

    # --- HTTP helpers -------------------------------------------------------------------------------

    def _post(self, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        try:
            return self._http.post(self.url + path, content=body,
                                   headers={**headers, "Content-Type": "application/octet-stream"})
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
    try:
        doc = response.json()
    except ValueError as exc:
        raise ServerError(f"{what}: the server's answer is not JSON") from exc
    if not isinstance(doc, dict):
        raise ServerError(f"{what}: the server's answer is not a JSON object")
    return doc
