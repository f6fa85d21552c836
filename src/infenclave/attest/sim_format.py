"""The simulated-TEE evidence format, shared by the enclave (signer) and the client (verifier).

The enclave imports this module and nothing else from `infenclave.attest`, so it depends on
the standard library and `infenclave.errors` only: it is part of the trusted computing base,
and pulling the verifier (dcap-qvl, X.509 parsing) into the enclave would grow it for nothing.

Wire format (version 1)::

    raw  = UTF-8 JSON {"format": "infenclave-sim-evidence/1",
                       "body": base64(body), "signature": base64(Ed25519(signer, body))}
    body = canonical JSON (sorted keys, no whitespace) of
           {"tee": "simulated", "measurement": <64 hex>, "report_data": <128 hex>,
            "debug": <bool>, "issued_at": <int unix seconds>, "signer": <64 hex Ed25519 key>}

The signature covers the body *bytes*; the verifier also re-canonicalises the parsed claims
and refuses a body that is not byte-identical, so that one set of claims has exactly one
signed encoding. Hex is lower case, base64 is the standard alphabet with padding.

This module only parses and canonicalises. It does not verify the signature: that is the
verifier's job (`infenclave.attest.verifier`), which treats everything here as unverified.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from infenclave.errors import VerificationError

__all__ = [
    "MAX_SIM_EVIDENCE_BYTES",
    "MIN_NONCE_BYTES",
    "SIM_EVIDENCE_FORMAT",
    "SIM_TEE",
    "UnverifiedSimEvidence",
    "expected_report_data",
    "parse_sim_evidence",
    "sim_body_bytes",
    "sim_evidence_bytes",
]

SIM_EVIDENCE_FORMAT = "infenclave-sim-evidence/1"
SIM_TEE = "simulated"

#: A version-1 document is about 600 bytes; anything far larger is not ours.
MAX_SIM_EVIDENCE_BYTES = 16 * 1024
#: Freshness comes from the nonce: fewer than 128 bits could be guessed or repeated.
MIN_NONCE_BYTES = 16
#: Hash and zero-pad to the 64-byte REPORTDATA field every TEE carries.
REPORT_DATA_BYTES = 64
ED25519_SIGNATURE_BYTES = 64

_CLAIM_KEYS = frozenset({"tee", "measurement", "report_data", "debug", "issued_at", "signer"})
_WRAPPER_KEYS = frozenset({"format", "body", "signature"})
_HEX_64 = re.compile(r"[0-9a-f]{64}")
_HEX_128 = re.compile(r"[0-9a-f]{128}")
# issued_at must fit a signed 64-bit integer: larger numbers are garbage, not times.
_MAX_ISSUED_AT = 2**63 - 1


@dataclass(frozen=True)
class UnverifiedSimEvidence:
    """Simulated evidence split into its parts; NOT verified: the signature is unchecked."""

    body: bytes
    signature: bytes
    claims: Mapping[str, Any]


def expected_report_data(public_key: bytes, nonce: bytes) -> bytes:
    """Return SHA-256(public_key || nonce) zero-padded to 64 bytes.

    This is what an enclave puts in REPORTDATA to bind its public key to the client's
    nonce (DESIGN.md, "Evidence binds the enclave's public key"), and what the client
    expects to find there. The nonce must be at least 16 bytes, or freshness is weak.
    """
    if not isinstance(public_key, bytes) or not public_key:
        raise VerificationError("report data binding: the public key must be non-empty bytes")
    if not isinstance(nonce, bytes) or len(nonce) < MIN_NONCE_BYTES:
        raise VerificationError(
            f"report data binding: the nonce must be at least {MIN_NONCE_BYTES} bytes"
        )
    digest = hashlib.sha256(public_key + nonce).digest()
    return digest + b"\x00" * (REPORT_DATA_BYTES - len(digest))


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


def parse_sim_evidence(raw: bytes) -> UnverifiedSimEvidence:
    """Parse raw simulated evidence into body, signature and claims; check structure only."""
    if len(raw) > MAX_SIM_EVIDENCE_BYTES:
        raise VerificationError(
            f"simulated evidence is {len(raw)} bytes, over the {MAX_SIM_EVIDENCE_BYTES} limit"
        )
    wrapper = _strict_json_object(raw, "simulated evidence")
    if set(wrapper) != _WRAPPER_KEYS:
        raise VerificationError(
            f"simulated evidence: expected keys {sorted(_WRAPPER_KEYS)}, got {sorted(wrapper)}"
        )
    if wrapper["format"] != SIM_EVIDENCE_FORMAT:
        raise VerificationError(
            f"simulated evidence: format {wrapper['format']!r} is not {SIM_EVIDENCE_FORMAT!r}"
        )
    body = _b64("body", wrapper["body"])
    signature = _b64("signature", wrapper["signature"])
    if len(signature) != ED25519_SIGNATURE_BYTES:
        raise VerificationError(
            f"simulated evidence: signature is {len(signature)} bytes, an Ed25519 one is 64"
        )
    claims = _strict_json_object(body, "simulated evidence body")
    # One set of claims has exactly one signed encoding: refuse any other spelling.
    if sim_body_bytes(claims) != body:
        raise VerificationError("simulated evidence: the body is not in canonical JSON form")
    return UnverifiedSimEvidence(body=body, signature=signature, claims=claims)


def _check_claims(claims: Mapping[str, Any]) -> None:
    """Refuse claims whose keys or value types are not exactly those of version 1."""
    if not isinstance(claims, Mapping):
        raise VerificationError("simulated evidence body: expected a JSON object")
    keys = set(claims)
    if keys != _CLAIM_KEYS:
        missing, extra = sorted(_CLAIM_KEYS - keys), sorted(keys - _CLAIM_KEYS)
        raise VerificationError(
            f"simulated evidence body: missing keys {missing}, unexpected keys {extra}"
        )
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


def _strict_json_object(data: bytes, what: str) -> dict[str, Any]:
    """Decode UTF-8 JSON into an object, refusing duplicate keys and non-objects."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise VerificationError(f"{what}: duplicate key {key!r}")
            result[key] = value
        return result

    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise VerificationError(f"{what}: not valid UTF-8 JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise VerificationError(f"{what}: expected a JSON object")
    return value


def _b64(key: str, value: Any) -> bytes:
    """Decode a strict standard-alphabet base64 string field."""
    if not isinstance(value, str):
        raise VerificationError(f"simulated evidence: {key} must be a base64 string")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError) as exc:
        raise VerificationError(f"simulated evidence: {key} is not valid base64") from exc
