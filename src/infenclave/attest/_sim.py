"""Cryptographic check of simulated evidence: the Ed25519 signature by the claimed signer.

Simulated evidence proves nothing about hardware: the signature shows only that whoever
holds the simulation key vouched for these claims. Which signers to believe (`sim_signers`)
and whether to accept simulation at all are policy decisions, made by the verifier.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from infenclave.attest.claims import Claims
from infenclave.attest.sim_format import SIM_TEE, UnverifiedSimEvidence
from infenclave.errors import VerificationError

__all__ = ["sim_claims", "verify_sim_signature"]


def verify_sim_signature(evidence: UnverifiedSimEvidence) -> None:
    """Verify the body signature under the signer key named in the body."""
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(evidence.claims["signer"]))
    except ValueError as exc:
        raise VerificationError("step 2 (simulated evidence): the signer key is invalid") from exc
    try:
        key.verify(evidence.signature, evidence.body)
    except InvalidSignature as exc:
        raise VerificationError(
            "step 2 (simulated evidence): the Ed25519 signature over the body is invalid"
        ) from exc


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
