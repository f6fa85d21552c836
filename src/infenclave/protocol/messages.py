"""End-to-end messages between a client (or the model owner) and the enclave.

The host relays these as opaque bytes. Each is HPKE-sealed (`infenclave.crypto.seal`) with
a context that names what it is, for which model and for which request, so that a
ciphertext made for one purpose, model or request cannot be opened as another:

- provisioning: ``context(PROVISION_TAG, model_id)``, sealed to the enclave key;
- request:      ``context(REQUEST_TAG, model_id, request_id)``, sealed to the enclave key;
- response:     ``context(REQUEST_TAG, model_id, request_id, b"response")``, sealed to the
  client's one-time X25519 key that travelled inside the request.

Request plaintext (version 1): ``b"IEREQ1" || u16be(k) || client public key (32) || image``.
Response plaintext: UTF-8 JSON ``{"predictions": [{"index", "label", "prob"}, ...]}`` or
``{"error": "<reason>"}`` (a refusal that only the client can read, e.g. an image limit).
"""

from __future__ import annotations

import re
import struct

from infenclave.crypto import X25519_KEY_SIZE, context
from infenclave.errors import CryptoError

__all__ = [
    "MAX_K",
    "PROVISION_TAG",
    "REQUEST_ID_RE",
    "REQUEST_TAG",
    "decode_request",
    "encode_request",
    "provision_context",
    "request_context",
    "response_context",
]

PROVISION_TAG = b"infenclave/provision/v1"
REQUEST_TAG = b"infenclave/request/v1"
_REQUEST_MAGIC = b"IEREQ1"
_REQUEST_HEAD = struct.Struct(">6sH")
#: top-k beyond this is not a classification answer any more (and bounds the response).
MAX_K = 100
#: Request ids are 128 random bits in lower-case hex, chosen by the client.
REQUEST_ID_RE = re.compile(r"[0-9a-f]{32}")


def _check_ids(model_id: str, request_id: str | None = None) -> None:
    if not isinstance(model_id, str) or re.fullmatch(r"[0-9a-f]{64}", model_id) is None:
        raise CryptoError("a model id is 64 lower-case hex digits")
    if request_id is not None and (not isinstance(request_id, str) or REQUEST_ID_RE.fullmatch(request_id) is None):
        raise CryptoError("a request id is 32 lower-case hex digits")


def provision_context(model_id: str) -> bytes:
    """Context of the model key sealed to an enclave."""
    _check_ids(model_id)
    return context(PROVISION_TAG, model_id)


def request_context(model_id: str, request_id: str) -> bytes:
    """Context of a client request sealed to an enclave."""
    _check_ids(model_id, request_id)
    return context(REQUEST_TAG, model_id, request_id)


def response_context(model_id: str, request_id: str) -> bytes:
    """Context of the enclave's answer sealed to the client's one-time key."""
    _check_ids(model_id, request_id)
    return context(REQUEST_TAG, model_id, request_id, b"response")


def encode_request(image: bytes, client_public: bytes, k: int) -> bytes:
    """The request plaintext (see module docstring)."""
    if len(client_public) != X25519_KEY_SIZE:
        raise CryptoError("the client public key must be 32 bytes")
    if not 1 <= k <= MAX_K:
        raise CryptoError(f"k must be 1..{MAX_K}")
    return _REQUEST_HEAD.pack(_REQUEST_MAGIC, k) + client_public + image


def decode_request(plaintext: bytes) -> tuple[bytes, bytes, int]:
    """Split a request plaintext into (image bytes, client public key, k)."""
    head = _REQUEST_HEAD.size
    if len(plaintext) < head + X25519_KEY_SIZE:
        raise CryptoError("request too short")
    magic, k = _REQUEST_HEAD.unpack_from(plaintext)
    if magic != _REQUEST_MAGIC or not 1 <= k <= MAX_K:
        raise CryptoError("not a version-1 request")
    client_public = plaintext[head : head + X25519_KEY_SIZE]
    return plaintext[head + X25519_KEY_SIZE :], client_public, k
