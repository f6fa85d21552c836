"""The simulated-TEE evidence format: what the enclave signs and the verifier parses.

Wire format (version 1)::

    raw  = UTF-8 JSON {"format": "infenclave-sim-evidence/1",
                       "body": base64(body), "signature": base64(Ed25519(signer, body))}
    body = canonical JSON (sorted keys, no whitespace) of
           {"tee": "simulated", "measurement": <64 hex>, "report_data": <128 hex>,
            "debug": <bool>, "issued_at": <int unix seconds>, "signer": <64 hex Ed25519 key>}

The signature covers the body *bytes*; the verifier also re-canonicalises the parsed claims
and refuses a body that is not byte-identical, so that one set of claims has exactly one
signed encoding. Hex is lower case, base64 is the standard alphabet with padding.

This module holds the signer's half (claims check, canonical body, document) and is part of
the trusted computing base; the parser, which only the verifier runs, lives in
`infenclave.attest._sim`, so the enclave carries no code it never executes.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from typing import Any

from infenclave.errors import VerificationError

__all__ = [
    "CLAIM_KEYS",
    "ED25519_SIGNATURE_BYTES",
    "MAX_SIM_EVIDENCE_BYTES",
    "SIM_EVIDENCE_FORMAT",
    "SIM_TEE",
    "WRAPPER_KEYS",
    "sim_body_bytes",
    "sim_evidence_bytes",
]

SIM_EVIDENCE_FORMAT = "infenclave-sim-evidence/1"
SIM_TEE = "simulated"

#: A version-1 document is about 600 bytes; anything far larger is not ours.
MAX_SIM_EVIDENCE_BYTES = 16 * 1024
ED25519_SIGNATURE_BYTES = 64

CLAIM_KEYS = frozenset({"tee", "measurement", "report_data", "debug", "issued_at", "signer"})
WRAPPER_KEYS = frozenset({"format", "body", "signature"})
_HEX_64 = re.compile(r"[0-9a-f]{64}")
_HEX_128 = re.compile(r"[0-9a-f]{128}")
# issued_at must fit a signed 64-bit integer: larger numbers are garbage, not times.
_MAX_ISSUED_AT = 2**63 - 1


def sim_body_bytes(claims: Mapping[str, Any]) -> bytes:
    """Return the canonical body bytes that the simulation key signs.

    Checks the claims first (exact key set, types, lower-case hex), so that a signer can
    never sign something the verifier would refuse to parse.
    """
    _check_claims(claims)
    return json.dumps(dict(claims), sort_keys=True, separators=(",", ":")).encode("utf-8")


def sim_evidence_bytes(body: bytes, signature: bytes) -> bytes:
    """Wrap signed body bytes into the raw evidence document (the inverse of parsing)."""
    if len(signature) != ED25519_SIGNATURE_BYTES:
        raise VerificationError("simulated evidence: an Ed25519 signature is 64 bytes")
    document = {
        "format": SIM_EVIDENCE_FORMAT,
        "body": base64.b64encode(body).decode("ascii"),
        "signature": base64.b64encode(signature).decode("ascii"),
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _check_claims(claims: Mapping[str, Any]) -> None:
    """Refuse claims whose keys or value types are not exactly those of version 1."""
    if not isinstance(claims, Mapping):
        raise VerificationError("simulated evidence body: expected a JSON object")
    keys = set(claims)
    if keys != CLAIM_KEYS:
        missing, extra = sorted(CLAIM_KEYS - keys), sorted(keys - CLAIM_KEYS)
        raise VerificationError(f"simulated evidence body: missing keys {missing}, unexpected keys {extra}")
    if claims["tee"] != SIM_TEE:
        raise VerificationError(f"simulated evidence body: tee must be {SIM_TEE!r}")
    for key, pattern, what in (
        ("measurement", _HEX_64, "64 lower-case hex digits"),
        ("report_data", _HEX_128, "128 lower-case hex digits"),
        ("signer", _HEX_64, "64 lower-case hex digits (a raw Ed25519 public key)"),
    ):
        value = claims[key]
        if not isinstance(value, str) or pattern.fullmatch(value) is None:
            raise VerificationError(f"simulated evidence body: {key} must be {what}")
    if not isinstance(claims["debug"], bool):
        raise VerificationError("simulated evidence body: debug must be true or false")
    issued_at = claims["issued_at"]
    # bool is an int subclass in Python: refuse it explicitly.
    if isinstance(issued_at, bool) or not isinstance(issued_at, int):
        raise VerificationError("simulated evidence body: issued_at must be an integer")
    if not 0 <= issued_at <= _MAX_ISSUED_AT:
        raise VerificationError("simulated evidence body: issued_at is out of range")
