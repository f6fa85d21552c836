"""Attested key release: the messages between a host and the owner's key server.

The flow follows the Confidential Containers key broker (request, challenge, attestation,
resource), with infenclave's own evidence binding:

1. ``POST CHALLENGE_PATH`` ``{"model_id"}`` -> ``{"nonce": <hex, NONCE_BYTES>, "ttl_s"}``:
   a fresh, single-use nonce that expires after ``ttl_s`` seconds.
2. The host asks one of its enclave workers for evidence over that nonce (an ordinary
   EVIDENCE frame): the report data binds the worker's key, the model id and the nonce
   (`infenclave.protocol.binding`).
3. ``POST KEY_PATH`` ``{"model_id", "nonce", "public_key": <hex>, "evidence": <envelope>}``
   -> ``{"sealed_key": <base64>}``: the key server verifies the evidence with the same
   verifier and policy loader clients use, and answers the model key HPKE-sealed to that
   worker's key under `infenclave.protocol.messages.provision_context` — exactly what an
   owner sends, so the enclave receives it as an ordinary PROVISION frame.

Every refusal is one opaque ``{"error": "refused"}`` (HTTP 403) to the peer; the key server's
audit log says which step refused. ``429`` ``{"error": "rate_limited"}`` when a peer asks too
often. The host relays all of it and sees only the nonce, the evidence and the sealed key.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from infenclave.errors import VerificationError
from infenclave.protocol.binding import MAX_NONCE_BYTES, MIN_NONCE_BYTES
from infenclave.protocol.strict_json import loads_object

__all__ = [
    "CHALLENGE_PATH",
    "KEY_PATH",
    "MAX_KEY_REQUEST_BYTES",
    "NONCE_BYTES",
    "challenge_request",
    "decode_challenge",
    "decode_challenge_request",
    "decode_key_request",
    "decode_key_response",
    "encode_challenge",
    "encode_key_request",
    "encode_key_response",
]

CHALLENGE_PATH = "/v1/key-release/challenge"
KEY_PATH = "/v1/key-release/key"
NONCE_BYTES = 32
#: A key request carries one evidence envelope (<= 2 MiB, `protocol.envelope`) and ids.
MAX_KEY_REQUEST_BYTES = 3 * 1024 * 1024
_MODEL_ID = re.compile(r"[0-9a-f]{64}")
_KEY = re.compile(r"[0-9a-f]{64}")


def _need(document: dict[str, Any], keys: set[str], what: str) -> None:
    if set(document) != keys:
        raise VerificationError(f"{what}: expected keys {sorted(keys)}, got {sorted(document)}")


def _model_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or _MODEL_ID.fullmatch(value) is None:
        raise VerificationError(f"{what}: a model id is 64 lower-case hex digits")
    return value


def _nonce(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or re.fullmatch(r"(?:[0-9a-f]{2})+", value) is None:
        raise VerificationError(f"{what}: the nonce is not lower-case hex")
    nonce = bytes.fromhex(value)
    if not MIN_NONCE_BYTES <= len(nonce) <= MAX_NONCE_BYTES:
        raise VerificationError(f"{what}: nonce length out of range")
    return nonce


def challenge_request(model_id: str) -> dict[str, Any]:
    """Step 1, host -> key server."""
    return {"model_id": _model_id(model_id, "challenge request")}


def decode_challenge_request(data: bytes) -> str:
    """Step 1 at the key server: the model id asked for."""
    document = loads_object(data, "challenge request", VerificationError)
    _need(document, {"model_id"}, "challenge request")
    return _model_id(document["model_id"], "challenge request")


def encode_challenge(nonce: bytes, ttl_s: int) -> dict[str, Any]:
    """Step 1, key server -> host."""
    return {"nonce": nonce.hex(), "ttl_s": ttl_s}


def decode_challenge(data: bytes) -> bytes:
    """Step 1 at the host: the nonce to get evidence over."""
    document = loads_object(data, "challenge", VerificationError)
    _need(document, {"nonce", "ttl_s"}, "challenge")
    return _nonce(document["nonce"], "challenge")


def encode_key_request(model_id: str, nonce: bytes, public_key: bytes, envelope: bytes) -> dict[str, Any]:
    """Step 3, host -> key server (*envelope*: `protocol.envelope.encode_envelope` output)."""
    return {
        "model_id": _model_id(model_id, "key request"),
        "nonce": nonce.hex(),
        "public_key": public_key.hex(),
        "evidence": envelope.decode("utf-8"),
    }


def decode_key_request(data: bytes) -> tuple[str, bytes, bytes, bytes]:
    """Step 3 at the key server: (model id, nonce, enclave public key, evidence envelope).
    Structure only; the key server verifies the evidence."""
    if len(data) > MAX_KEY_REQUEST_BYTES:
        raise VerificationError("key request: over the size limit")
    document = loads_object(data, "key request", VerificationError)
    _need(document, {"model_id", "nonce", "public_key", "evidence"}, "key request")
    public_key = document["public_key"]
    if not isinstance(public_key, str) or _KEY.fullmatch(public_key) is None:
        raise VerificationError("key request: the public key is 64 lower-case hex digits")
    if not isinstance(document["evidence"], str):
        raise VerificationError("key request: evidence must be the envelope as a string")
    return (
        _model_id(document["model_id"], "key request"),
        _nonce(document["nonce"], "key request"),
        bytes.fromhex(public_key),
        document["evidence"].encode("utf-8"),
    )


def encode_key_response(sealed_key: bytes) -> dict[str, Any]:
    """Step 3, key server -> host: the model key sealed to the enclave."""
    return {"sealed_key": base64.b64encode(sealed_key).decode("ascii")}


def decode_key_response(data: bytes) -> bytes:
    """Step 3 at the host: the sealed model key, for a PROVISION frame."""
    document = loads_object(data, "key response", VerificationError)
    _need(document, {"sealed_key"}, "key response")
    try:
        return base64.b64decode(str(document["sealed_key"]).encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise VerificationError("key response: sealed_key is not base64") from exc
