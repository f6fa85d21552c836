"""Simulated evidence on the verifier's side: parse the document, check the Ed25519 signature.

The format itself (and the signer's half) is `infenclave.protocol.sim_evidence`; parsing
lives here because only the verifier runs it.

Simulated evidence proves nothing about hardware: the signature shows only that whoever
holds the simulation key vouched for these claims. Which signers to believe (`sim_signers`)
and whether to accept simulation at all are policy decisions, made by the verifier.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from infenclave.attest.claims import Claims
from infenclave.errors import VerificationError
from infenclave.protocol.sim_evidence import (
    ED25519_SIGNATURE_BYTES,
    MAX_SIM_EVIDENCE_BYTES,
    SIM_EVIDENCE_FORMAT,
    SIM_TEE,
    WRAPPER_KEYS,
    sim_body_bytes,
)
from infenclave.protocol.strict_json import loads_object

__all__ = ["UnverifiedSimEvidence", "parse_sim_evidence", "sim_claims", "verify_sim_signature"]


@dataclass(frozen=True)
class UnverifiedSimEvidence:
    """Simulated evidence split into its parts; NOT verified: the signature is unchecked."""

    body: bytes
    signature: bytes
    claims: Mapping[str, Any]


def parse_sim_evidence(raw: bytes) -> UnverifiedSimEvidence:
    """Parse raw simulated evidence into body, signature and claims; check structure only."""
    if len(raw) > MAX_SIM_EVIDENCE_BYTES:
        raise VerificationError(f"simulated evidence is {len(raw)} bytes, over the {MAX_SIM_EVIDENCE_BYTES} limit")
    wrapper = loads_object(raw, "simulated evidence", VerificationError)
    if set(wrapper) != WRAPPER_KEYS:
        raise VerificationError(f"simulated evidence: expected keys {sorted(WRAPPER_KEYS)}, got {sorted(wrapper)}")
    if wrapper["format"] != SIM_EVIDENCE_FORMAT:
        raise VerificationError(f"simulated evidence: format {wrapper['format']!r} is not {SIM_EVIDENCE_FORMAT!r}")
    body = _b64("body", wrapper["body"])
    signature = _b64("signature", wrapper["signature"])
    if len(signature) != ED25519_SIGNATURE_BYTES:
        raise VerificationError(f"simulated evidence: signature is {len(signature)} bytes, an Ed25519 one is 64")
    claims = loads_object(body, "simulated evidence body", VerificationError)
    # One set of claims has exactly one signed encoding: refuse any other spelling.
    if sim_body_bytes(claims) != body:
        raise VerificationError("simulated evidence: the body is not in canonical JSON form")
    return UnverifiedSimEvidence(body=body, signature=signature, claims=claims)


def _b64(key: str, value: Any) -> bytes:
    """Decode a strict standard-alphabet base64 string field."""
    if not isinstance(value, str):
        raise VerificationError(f"simulated evidence: {key} must be a base64 string")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError) as exc:
        raise VerificationError(f"simulated evidence: {key} is not valid base64") from exc


def verify_sim_signature(evidence: UnverifiedSimEvidence) -> None:
    """Verify the body signature under the signer key named in the body."""
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(evidence.claims["signer"]))
    except ValueError as exc:
        raise VerificationError("step 2 (simulated evidence): the signer key is invalid") from exc
    try:
        key.verify(evidence.signature, evidence.body)
    except InvalidSignature as exc:
        raise VerificationError("step 2 (simulated evidence): the Ed25519 signature over the body is invalid") from exc


def sim_claims(evidence: UnverifiedSimEvidence) -> Claims:
    """Claims of simulated evidence whose signature `verify_sim_signature` has checked."""
    claims = evidence.claims
    return Claims(
        tee=SIM_TEE,
        measurements={"measurement": claims["measurement"]},
        debug=claims["debug"],
        tcb_status=None,
        advisory_ids=(),
        report_data=bytes.fromhex(claims["report_data"]),
        details={
            "signer": claims["signer"],
            "issued_at": str(claims["issued_at"]),
            "warning": "SIMULATED TEE: no hardware protection",
        },
    )
