"""Client-side attestation: parse evidence, verify it cryptographically, apply a policy.

Typical use::

    from infenclave.attest import load_policy, parse_evidence_envelope, verify, expected_report_data

    evidence = parse_evidence_envelope(response_bytes)          # structure only
    claims = verify(evidence, load_policy(path),
                    expected_report_data=expected_report_data(enclave_pubkey, nonce),
                    now=datetime.now(timezone.utc))             # raises VerificationError

Names are imported lazily (PEP 562): the enclave imports `infenclave.attest.sim_format`
alone, and importing it must not pull the verifier, dcap-qvl or X.509 code into the
enclave's trusted computing base.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from infenclave.attest.claims import Claims
    from infenclave.attest.evidence import (
        ENVELOPE_FORMAT,
        Evidence,
        load_evidence_file,
        parse_evidence_envelope,
    )
    from infenclave.attest.policy import TEE_TYPES, Measurements, Policy, load_policy
    from infenclave.attest.sim_format import (
        SIM_EVIDENCE_FORMAT,
        expected_report_data,
        sim_body_bytes,
    )
    from infenclave.attest.verifier import PolicyRefusal, verify

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

_HOME: dict[str, str] = {
    "Claims": "claims",
    "ENVELOPE_FORMAT": "evidence",
    "Evidence": "evidence",
    "load_evidence_file": "evidence",
    "parse_evidence_envelope": "evidence",
    "TEE_TYPES": "policy",
    "Measurements": "policy",
    "Policy": "policy",
    "load_policy": "policy",
    "SIM_EVIDENCE_FORMAT": "sim_format",
    "expected_report_data": "sim_format",
    "sim_body_bytes": "sim_format",
    "PolicyRefusal": "verifier",
    "verify": "verifier",
}


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use."""
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
