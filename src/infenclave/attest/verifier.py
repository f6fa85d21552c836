"""Verify attestation evidence: cryptography first, then the client's policy.

Steps, in order; every refusal names its step and keeps the third-party cause (`from exc`):

1. Structure. `Evidence` checked layout and sizes when it was built; the parts are parsed
   again here into typed views (`_unverified_*`) that nothing trusts yet.
2. Cryptography (`_verify_crypto`), by TEE type:
   - SGX / TDX: with collateral, dcap-qvl verifies the quote against the pinned Intel SGX
     Root CA: PCK chain, CRLs, TCB info, QE identity, QE report, quote signature, and
     returns the TCB status with advisories. Without collateral only the quote's own
     chain and signatures are checked (`_dcap`, O1-O6) and the TCB status stays unknown.
   - SEV-SNP: ARK (pinned) -> ASK -> VCEK, RSA-PSS SHA-384; the report's ECDSA P-384
     signature by the VCEK; VCEK chip id and TCB equal the report's (`_snp`, S1-S6).
   - Simulated: the Ed25519 signature over the body by the signer named in it.
   With `policy=None` verification stops after step 2 (and step 4 if report data is
   expected): "crypto only", for inspecting evidence, never for trusting it.
3. Policy:
   a. the TEE type is accepted, and simulated evidence only if the policy says
      `allow_simulation` (`Policy.unsafe_allows_simulation`);
   b. simulated evidence: from a listed signer when `sim_signers` is set, issued within
      `max_evidence_age_s` and not in the future; accepting it is logged as a warning;
   c. debug refused unless `allow_debug` (SGX ATTRIBUTES.DEBUG, TDX TD_ATTRIBUTES.DEBUG,
      SNP guest policy bit 19, the simulated `debug` claim);
   d. TCB: SGX/TDX status in `tcb_statuses` (unknown without collateral: refused);
      SEV-SNP has no status, its reported TCB is accepted once step 2 bound the VCEK to
      it; simulated evidence has none;
   e. each measurement kind the policy lists for this TEE matches one listed value; a
      policy that lists none for this TEE refuses; SEV-SNP: the VMPL is in ``snp_vmpls``.
4. Report data equals `expected_report_data`, compared in constant time, when given.
"""

from __future__ import annotations

import hmac
import logging
from datetime import datetime

from infenclave.attest import _dcap, _sim, _snp
from infenclave.attest._quote import parse_quote
from infenclave.attest._sim import parse_sim_evidence
from infenclave.attest.claims import REPORT_DATA_BYTES, Claims
from infenclave.attest.evidence import Evidence
from infenclave.attest.policy import MEASUREMENTS_FOR_TEE, Policy
from infenclave.errors import VerificationError

__all__ = ["MAX_CLOCK_SKEW_S", "PolicyRefusal", "verify"]

logger = logging.getLogger(__name__)

#: How far in the future a simulated `issued_at` may be: clocks of two local processes
#: agree to well within this.
MAX_CLOCK_SKEW_S = 60

# Policy measurement kind -> name of the claim it is compared with.
_CLAIM_FOR_KIND = {
    "mrenclave": "mrenclave",
    "mrsigner": "mrsigner",
    "mrtd": "mrtd",
    "rtmr0": "rtmr0",
    "rtmr1": "rtmr1",
    "rtmr2": "rtmr2",
    "rtmr3": "rtmr3",
    "snp_measurement": "measurement",
    "snp_host_data": "host_data",
    "sim": "measurement",
}


class PolicyRefusal(VerificationError):
    """Evidence passed its cryptographic checks but the policy (or report data) refused it.

    `claims` holds what the verified evidence says, for display and logs: never act on it.
    """

    def __init__(self, message: str, claims: Claims) -> None:
        super().__init__(message)
        self.claims = claims


def verify(
    evidence: Evidence,
    policy: Policy | None,
    *,
    expected_report_data: bytes | None,
    now: datetime,
) -> Claims:
    """Verify `evidence` at time `now`; return its claims or raise `VerificationError`.

    `policy=None` runs the cryptographic steps only (and the report data check when
    `expected_report_data` is given): useful to inspect evidence, never enough to trust it.
    A refusal after the cryptographic steps is a `PolicyRefusal` carrying the claims.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    if expected_report_data is not None and len(expected_report_data) != REPORT_DATA_BYTES:
        raise ValueError(f"expected_report_data must be {REPORT_DATA_BYTES} bytes")

    # Steps 1 and 2.
    claims = _verify_crypto(evidence, now)

    # Step 3.
    if policy is not None:
        _apply_policy(claims, policy, now)

    # Step 4. Report data binds the enclave key and the client's nonce.
    if expected_report_data is not None and not hmac.compare_digest(claims.report_data, expected_report_data):
        raise PolicyRefusal(
            "step 4 (report data): the evidence's report data does not equal the expected "
            "SHA-256(enclave key || nonce): stale, replayed or for another key",
            claims,
        )
    return claims


def _verify_crypto(evidence: Evidence, now: datetime) -> Claims:
    """Steps 1 and 2: parse the parts again, check signatures and chains, read the claims."""
    if evidence.tee in ("sgx", "tdx"):
        _unverified_quote = parse_quote(evidence.raw)
        if evidence.collateral is not None:
            verdict = _dcap.verify_with_collateral(_unverified_quote, evidence.raw, evidence.collateral, now)
        else:
            verdict = _dcap.verify_without_collateral(_unverified_quote, now)
        return _dcap.quote_claims(_unverified_quote, verdict)
    if evidence.tee == "sev-snp":
        _unverified_report = _snp.parse_snp_report(evidence.raw)
        if evidence.certificates is None:
            raise VerificationError(
                "step 2 (SEV-SNP chain): no certificates: the VCEK and its ASK/ARK chain are "
                "required (pass them as a PEM bundle, or put vcek.der and ask_ark_milan.pem "
                "beside the report)"
            )
        _unverified_certificates = _snp.parse_snp_certificates(evidence.certificates)
        _snp.verify_snp(_unverified_report, _unverified_certificates, now)
        return _snp.snp_claims(_unverified_report)
    _unverified_sim = parse_sim_evidence(evidence.raw)
    _sim.verify_sim_signature(_unverified_sim)
    return _sim.sim_claims(_unverified_sim)


def _apply_policy(claims: Claims, policy: Policy, now: datetime) -> None:
    """Step 3: refuse with `PolicyRefusal` at the first policy check that fails."""
    # 3a. TEE type.
    if claims.tee == "simulated" and not policy.unsafe_allows_simulation:
        raise PolicyRefusal(
            "step 3a (TEE type): simulated evidence has no hardware protection and the policy "
            "does not allow simulation (allow_simulation is false)",
            claims,
        )
    if claims.tee not in policy.tee_types:
        raise PolicyRefusal(
            f"step 3a (TEE type): {claims.tee} evidence is not accepted by the policy "
            f"(accepted: {', '.join(policy.tee_types)})",
            claims,
        )

    # 3b. Simulation: allowed only by the explicitly unsafe switch, from a known signer, fresh.
    if claims.tee == "simulated":
        signer = claims.details["signer"]
        if policy.sim_signers is not None and signer not in policy.sim_signers:
            raise PolicyRefusal(
                f"step 3b (simulation): signer {signer} is not in the policy's sim_signers",
                claims,
            )
        age = int(now.timestamp()) - int(claims.details["issued_at"])
        if age > policy.max_evidence_age_s:
            raise PolicyRefusal(
                f"step 3b (freshness): the evidence was issued {age} s ago, more than the "
                f"policy's max_evidence_age_s ({policy.max_evidence_age_s} s)",
                claims,
            )
        if age < -MAX_CLOCK_SKEW_S:
            raise PolicyRefusal(
                f"step 3b (freshness): the evidence claims to be issued {-age} s in the future",
                claims,
            )
        logger.warning(
            "accepting SIMULATED attestation evidence (signer %s): there is no hardware "
            "protection; the policy allows simulation, which is for development only",
            signer,
        )

    # 3c. Debug: a debug enclave's memory can be read by the host.
    if claims.debug and not policy.allow_debug:
        raise PolicyRefusal(
            f"step 3c (debug): the {claims.tee} evidence comes from a DEBUG enclave/guest, "
            "whose memory the host can read; the policy does not allow debug",
            claims,
        )

    # 3d. TCB status.
    if claims.tee in ("sgx", "tdx"):
        if claims.tcb_status is None:
            raise PolicyRefusal(
                "step 3d (TCB): no collateral was given, so revocation and the TCB status are "
                "unknown; the policy requires one of " + ", ".join(policy.tcb_statuses),
                claims,
            )
        if claims.tcb_status not in policy.tcb_statuses:
            advisories = ", ".join(claims.advisory_ids) or "none"
            raise PolicyRefusal(
                f"step 3d (TCB): TCB status {claims.tcb_status} is not accepted by the policy "
                f"(accepted: {', '.join(policy.tcb_statuses)}; advisories: {advisories})",
                claims,
            )

    # 3e. Measurements.
    kinds = [k for k in MEASUREMENTS_FOR_TEE[claims.tee] if policy.measurements.for_kind(k)]
    if not kinds:
        raise PolicyRefusal(
            f"step 3e (measurement): the policy lists no measurement for {claims.tee}",
            claims,
        )
    for kind in kinds:
        actual = claims.measurements[_CLAIM_FOR_KIND[kind]]
        if not any(hmac.compare_digest(actual, accepted) for accepted in policy.measurements.for_kind(kind)):
            raise PolicyRefusal(
                f"step 3e (measurement): {kind} {actual} is not one the policy accepts",
                claims,
            )
    if claims.tee == "sev-snp" and int(claims.measurements["vmpl"]) not in (policy.snp_vmpls or ()):
        raise PolicyRefusal(
            f"step 3e (measurement): the SNP report comes from VMPL {claims.measurements['vmpl']}, "
            "which the policy's snp_vmpls does not list",
            claims,
        )
