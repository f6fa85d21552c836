"""Cryptographic verification of Intel DCAP quotes (SGX v3, TDX v4/v5).

With collateral (the normal case) dcap-qvl does everything: PCK chain to the pinned Intel
SGX Root CA, CRLs, TCB info and QE identity signatures and validity at `now`, the QE report,
the attestation key binding, the quote signature, and the TCB status with its advisories.

Without collateral only what the quote itself carries can be checked, and is, here:

    O1. The quoting enclave is Intel's (QE vendor id).
    O2. The PCK chain embedded in the quote ends at the pinned Intel SGX Root CA; each
        certificate is signed by the next and valid at `now`. (No CRL: revocation unknown.)
    O3. The QE report is signed by the PCK leaf key.
    O4. The QE is Intel's, by identity: MRSIGNER and ISVPRODID pinned below, not debug.
    O5. The QE report binds the attestation key: REPORTDATA = SHA-256(key || auth data).
    O6. The quote (header and body) is signed by that attestation key.

That proves the quote came from a genuine Intel platform's QE, but not that the platform is
unrevoked or patched, so the claims carry no TCB status and no policy accepts them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from dataclasses import dataclass
from datetime import datetime

import dcap_qvl
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from infenclave.attest._quote import INTEL_QE_VENDOR_ID, UnverifiedQuote
from infenclave.attest._roots import intel_sgx_root_ca, intel_sgx_root_ca_der
from infenclave.attest._x509 import check_validity, load_pem_certificates
from infenclave.attest.claims import Claims
from infenclave.errors import VerificationError

__all__ = ["DcapVerdict", "quote_claims", "verify_with_collateral", "verify_without_collateral"]

# Intel's quoting enclaves, from Intel's QE identity documents (PCS API v4,
# /sgx/certification/v4/qe/identity and /tdx/certification/v4/qe/identity; the same values
# are in the shared sample collateral): MRSIGNER, ISVPRODID, ATTRIBUTES and its mask.
_INTEL_QES: dict[str, tuple[bytes, int]] = {
    "sgx": (bytes.fromhex("8c4f5775d796503e96137f77c68a829a0056ac8ded70140b081b094490c57bff"), 1),
    "tdx": (bytes.fromhex("dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5"), 2),
}
_QE_ATTRIBUTES = bytes.fromhex("11000000000000000000000000000000")
_QE_ATTRIBUTES_MASK = bytes.fromhex("fbffffffffffffff0000000000000000")

# SGX REPORT body offsets (SGX developer reference, sgx_report_body_t).
_R_ATTRIBUTES = 48
_R_MRENCLAVE = 64
_R_MRSIGNER = 128
_R_ISV_PROD_ID = 256
_R_ISV_SVN = 258
_R_REPORT_DATA = 320
_SGX_FLAG_DEBUG = 0x02  # ATTRIBUTES.FLAGS bit 1

# TDREPORT offsets (TDX DCAP quoting library API, TD quote body).
_TD_TEE_TCB_SVN = 0
_TD_MR_SEAM = 16
_TD_ATTRIBUTES = 120
_TD_MR_TD = 136
_TD_RTMR0 = 328
_TD_REPORT_DATA = 520
_TD_ATTR_DEBUG = 0x01  # TD_ATTRIBUTES bit 0 (TUD.DEBUG)


@dataclass(frozen=True)
class DcapVerdict:
    """Outcome of the cryptographic step for a DCAP quote."""

    tcb_status: str | None
    advisory_ids: tuple[str, ...]
    collateral_checked: bool


def verify_with_collateral(quote: UnverifiedQuote, raw: bytes, collateral: bytes, now: datetime) -> DcapVerdict:
    """Verify fully with dcap-qvl against the pinned Intel root; return TCB status, advisories."""
    try:
        parsed_collateral = dcap_qvl.QuoteCollateralV3.from_json(collateral.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise VerificationError(f"step 2 (DCAP collateral): not a valid dcap-qvl collateral document: {exc}") from exc
    try:
        report = dcap_qvl.verify_with_root_ca(raw, parsed_collateral, intel_sgx_root_ca_der(), int(now.timestamp()))
    except ValueError as exc:
        raise VerificationError(f"step 2 (DCAP quote verification): {_explain(str(exc))}") from exc
    _cross_check(quote, report.to_json())
    return DcapVerdict(
        tcb_status=str(report.status),
        advisory_ids=tuple(str(advisory) for advisory in report.advisory_ids),
        collateral_checked=True,
    )


def verify_without_collateral(quote: UnverifiedQuote, now: datetime) -> DcapVerdict:
    """Check what the quote itself carries (steps O1-O6 above); no TCB status results."""
    step = "step 2 (DCAP quote without collateral)"
    # O1. The quoting enclave is Intel's.
    if quote.qe_vendor_id != INTEL_QE_VENDOR_ID:
        raise VerificationError(f"{step}: QE vendor id {quote.qe_vendor_id.hex()} is not Intel's")

    # O2. PCK leaf <- intermediate <- pinned Intel SGX Root CA, each valid at `now`.
    chain = load_pem_certificates(quote.pck_chain_pem, f"{step}: PCK chain")
    if len(chain) != 3:
        raise VerificationError(f"{step}: PCK chain has {len(chain)} certificates, expected 3")
    leaf, intermediate, root = chain
    pinned_root = intel_sgx_root_ca()
    if root.public_bytes(Encoding.DER) != pinned_root.public_bytes(Encoding.DER):
        raise VerificationError(f"{step}: the PCK chain does not end at the Intel SGX Root CA")
    for certificate, issuer, name in (
        (leaf, intermediate, "PCK"),
        (intermediate, pinned_root, "PCK CA"),
    ):
        try:
            certificate.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise VerificationError(f"{step}: {name} certificate is not signed by its issuer") from exc
    _require_ca(intermediate, f"{step}: PCK CA")
    for certificate, name in ((leaf, "PCK"), (intermediate, "PCK CA"), (pinned_root, "Intel root")):
        try:
            check_validity(certificate, now, name)
        except VerificationError as exc:
            raise VerificationError(f"{step}: {exc}") from exc

    # O3. The QE report is signed by the PCK key.
    pck_key = leaf.public_key()
    if not isinstance(pck_key, ec.EllipticCurvePublicKey) or pck_key.curve.name != "secp256r1":
        raise VerificationError(f"{step}: the PCK key is not ECDSA P-256")
    _verify_p256(pck_key, quote.qe_report_signature, quote.qe_report, f"{step}: QE report signature")

    # O4. The QE is Intel's quoting enclave for this TEE type, and not a debug enclave.
    mrsigner, prod_id = _INTEL_QES[quote.tee]
    qe = quote.qe_report
    qe_mrsigner = qe[_R_MRSIGNER : _R_MRSIGNER + 32]
    qe_prod_id = struct.unpack_from("<H", qe, _R_ISV_PROD_ID)[0]
    if not hmac.compare_digest(qe_mrsigner, mrsigner) or qe_prod_id != prod_id:
        raise VerificationError(
            f"{step}: the quoting enclave is not Intel's (MRSIGNER {qe_mrsigner.hex()}, ISVPRODID {qe_prod_id})"
        )
    attributes = qe[_R_ATTRIBUTES : _R_ATTRIBUTES + 16]
    masked = bytes(a & m for a, m in zip(attributes, _QE_ATTRIBUTES_MASK, strict=True))
    if masked != _QE_ATTRIBUTES:
        raise VerificationError(f"{step}: QE attributes {attributes.hex()} are not the expected ones")

    # O5. The QE report binds the attestation key.
    expected = hashlib.sha256(quote.attestation_key + quote.qe_auth_data).digest() + bytes(32)
    if not hmac.compare_digest(qe[_R_REPORT_DATA : _R_REPORT_DATA + 64], expected):
        raise VerificationError(f"{step}: the QE report does not bind the attestation key")

    # O6. The quote is signed by the attestation key.
    try:
        attestation_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + quote.attestation_key)
    except ValueError as exc:
        raise VerificationError(f"{step}: the attestation key is not a P-256 point") from exc
    _verify_p256(attestation_key, quote.isv_signature, quote.signed, f"{step}: quote signature")
    return DcapVerdict(tcb_status=None, advisory_ids=(), collateral_checked=False)


def quote_claims(quote: UnverifiedQuote, verdict: DcapVerdict) -> Claims:
    """Read the claims from a quote body that `verify_*` has just authenticated."""
    body = quote.body
    details = {
        "quote_version": str(quote.version),
        "collateral": "checked (CRLs, TCB info, QE identity)"
        if verdict.collateral_checked
        else "ABSENT: revocation and TCB not checked; no policy accepts this",
    }
    if quote.tee == "sgx":
        flags = struct.unpack_from("<Q", body, _R_ATTRIBUTES)[0]
        measurements = {
            "mrenclave": body[_R_MRENCLAVE : _R_MRENCLAVE + 32].hex(),
            "mrsigner": body[_R_MRSIGNER : _R_MRSIGNER + 32].hex(),
            "isv_prod_id": str(struct.unpack_from("<H", body, _R_ISV_PROD_ID)[0]),
            "isv_svn": str(struct.unpack_from("<H", body, _R_ISV_SVN)[0]),
        }
        details["attributes"] = body[_R_ATTRIBUTES : _R_ATTRIBUTES + 16].hex()
        debug = bool(flags & _SGX_FLAG_DEBUG)
        report_data = body[_R_REPORT_DATA : _R_REPORT_DATA + 64]
    else:
        td_attributes = body[_TD_ATTRIBUTES : _TD_ATTRIBUTES + 8]
        measurements = {"mrtd": body[_TD_MR_TD : _TD_MR_TD + 48].hex()}
        for index in range(4):
            start = _TD_RTMR0 + 48 * index
            measurements[f"rtmr{index}"] = body[start : start + 48].hex()
        details["td_attributes"] = td_attributes.hex()
        details["mr_seam"] = body[_TD_MR_SEAM : _TD_MR_SEAM + 48].hex()
        details["tee_tcb_svn"] = body[_TD_TEE_TCB_SVN : _TD_TEE_TCB_SVN + 16].hex()
        debug = bool(td_attributes[0] & _TD_ATTR_DEBUG)
        report_data = body[_TD_REPORT_DATA : _TD_REPORT_DATA + 64]
    return Claims(
        tee=quote.tee,
        measurements=measurements,
        debug=debug,
        tcb_status=verdict.tcb_status,
        advisory_ids=verdict.advisory_ids,
        report_data=report_data,
        details=details,
    )


def _verify_p256(key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes, what: str) -> None:
    """Verify a raw r||s ECDSA P-256 SHA-256 signature."""
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:64], "big"))
    try:
        key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise VerificationError(f"{what} is invalid") from exc


def _require_ca(certificate: x509.Certificate, what: str) -> None:
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound as exc:
        raise VerificationError(f"{what} certificate has no basic constraints") from exc
    if not constraints.value.ca:
        raise VerificationError(f"{what} certificate is not a CA")


def _cross_check(quote: UnverifiedQuote, report_json: str) -> None:
    """Refuse if dcap-qvl's parse of the body differs from ours (a parser bug on either side)."""
    report = json.loads(report_json).get("report", {})
    if quote.tee == "sgx":
        theirs = report.get("SgxEnclave", {})
        ours = {
            "mr_enclave": quote.body[_R_MRENCLAVE : _R_MRENCLAVE + 32].hex(),
            "report_data": quote.body[_R_REPORT_DATA : _R_REPORT_DATA + 64].hex(),
        }
    else:
        # TD10 is flat; TD15 nests the 1.0 fields under "base".
        theirs = report.get("TD10") or report.get("TD15", {}).get("base", {})
        ours = {
            "mr_td": quote.body[_TD_MR_TD : _TD_MR_TD + 48].hex(),
            "report_data": quote.body[_TD_REPORT_DATA : _TD_REPORT_DATA + 64].hex(),
        }
    for key, value in ours.items():
        if str(theirs.get(key, "")).lower() != value:
            raise VerificationError(
                f"step 2 (DCAP quote verification): dcap-qvl reports {key} differently from the quote body; refusing"
            )


def _explain(message: str) -> str:
    """Prefix dcap-qvl's reason with what it means for the user, where that is known."""
    hints = {
        "Expired": "the collateral is expired at the verification time (fetch fresh collateral, "
        "or pass --at for archived evidence)",
        "No matching TCB level": "the platform's TCB matches no level in the TCB info",
        "signature is invalid": "a signature does not verify: the quote was altered or forged",
    }
    for needle, hint in hints.items():
        if needle in message:
            return f"{hint}; dcap-qvl: {message}"
    return f"dcap-qvl refused the quote: {message}"
