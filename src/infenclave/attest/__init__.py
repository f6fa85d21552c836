"""Client-side attestation: parse evidence, verify it cryptographically, apply a policy.

Typical use::

    from infenclave.attest import load_policy, parse_evidence_envelope, verify, expected_report_data

    evidence = parse_evidence_envelope(response_bytes)          # structure only
    claims = verify(evidence, load_policy(path),
                    expected_report_data=expected_report_data(enclave_pubkey, nonce),
                    now=datetime.now(timezone.utc))             # raises VerificationError

The enclave never imports this package (`infenclave.protocol.measurement` refuses to start
an enclave that did): what both sides share lives in `infenclave.protocol`.
"""

from __future__ import annotations

from infenclave.attest.claims import Claims
from infenclave.attest.evidence import (
    Evidence,
    load_evidence_file,
    parse_evidence_envelope,
)
from infenclave.attest.policy import TEE_TYPES, Measurements, Policy, load_policy
from infenclave.attest.verifier import PolicyRefusal, verify
from infenclave.protocol.binding import expected_report_data
from infenclave.protocol.envelope import ENVELOPE_FORMAT
from infenclave.protocol.sim_evidence import SIM_EVIDENCE_FORMAT, sim_body_bytes

__all__ = [
    "ENVELOPE_FORMAT",
    "SIM_EVIDENCE_FORMAT",
    "TEE_TYPES",
    "Claims",
    "Evidence",
    "Measurements",
    "Policy",
    "PolicyRefusal",
    "expected_report_data",
    "load_evidence_file",
    "load_policy",
    "parse_evidence_envelope",
    "sim_body_bytes",
    "verify",
]
