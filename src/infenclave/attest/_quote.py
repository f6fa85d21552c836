"""Structure of Intel DCAP ECDSA quotes (SGX v3, TDX v4/v5): parse only, verify nothing.

Layouts from Intel's "SGX ECDSA Quote Library API" (quote v3, appendix A) and "TDX DCAP
Quoting Library API" (quote v4 and v5, section A.3/A.4). All integers are little-endian.

    header (48)          version u16 | att_key_type u16 | tee_type u32 | ... |
                         qe_vendor_id[16] at 12 | user_data[20] at 28
    v3 SGX body (384)    SGX REPORT body
    v4 TDX body (584)    TDREPORT 1.0
    v5 (6 + size)        body_type u16 | body_size u32 | body (2: TD 1.0, 584; 3: TD 1.5, 648)
    sig_data_len u32, then signature data:
        isv_signature[64] | attestation_key[64] | certification data
    v3 certification:    qe_report[384] | qe_report_sig[64] | qe_auth (u16 len + data) |
                         cert_type u16 (5) | cert_size u32 | PCK chain (PEM)
    v4/v5 certification: cert_type u16 (6) | cert_size u32 | the v3 form above

The whole quote must be consumed: trailing bytes are refused unless they are all zero
(quote generation services hand out fixed-size, zero-padded buffers; the sample TDX v4 quote
carries 70 such bytes). dcap-qvl 0.7.0 ignores any trailing bytes, which would let unsigned
data ride along with a valid quote.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from infenclave.errors import VerificationError

__all__ = ["UnverifiedQuote", "parse_quote", "quote_tee"]

HEADER_BYTES = 48
SGX_REPORT_BYTES = 384
TD_REPORT_10_BYTES = 584
TD_REPORT_15_BYTES = 648
ECDSA_P256_SIG_BYTES = 64
ECDSA_P256_KEY_BYTES = 64

TEE_TYPE_SGX = 0x00000000
TEE_TYPE_TDX = 0x00000081
ATT_KEY_ECDSA_P256 = 2
CERT_TYPE_PCK_CHAIN = 5
CERT_TYPE_QE_REPORT = 6
V5_BODY_TD10 = 2
V5_BODY_TD15 = 3

#: Intel's QE vendor id (939A7233-F79C-4CA9-940A-0DB3957F0607), the only QE we know.
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")


@dataclass(frozen=True)
class UnverifiedQuote:
    """A DCAP quote split into its parts. NOT verified: nothing here has been checked."""

    version: int
    tee: str  # "sgx" or "tdx"
    qe_vendor_id: bytes
    body: bytes  # SGX REPORT body (384) or TDREPORT 1.0 (584) / 1.5 (648)
    signed: bytes  # header (and v5 body descriptor) and body: what the attestation key signs
    isv_signature: bytes  # ECDSA P-256 r||s, 64 bytes
    attestation_key: bytes  # P-256 public key x||y, 64 bytes
    qe_report: bytes  # the quoting enclave's SGX REPORT body, 384 bytes
    qe_report_signature: bytes  # by the PCK key, r||s
    qe_auth_data: bytes
    pck_chain_pem: bytes  # leaf PCK certificate, intermediate CA, root CA


class _Reader:
    """Bounds-checked cursor over untrusted bytes."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._offset = 0
        self._what = what

    def take(self, count: int, field: str) -> bytes:
        end = self._offset + count
        if count < 0 or end > len(self._data):
            raise VerificationError(
                f"{self._what}: truncated at {field} (needs {count} bytes at offset "
                f"{self._offset}, {len(self._data)} in all)"
            )
        chunk = self._data[self._offset : end]
        self._offset = end
        return chunk

    def u16(self, field: str) -> int:
        value: int = struct.unpack("<H", self.take(2, field))[0]
        return value

    def u32(self, field: str) -> int:
        value: int = struct.unpack("<I", self.take(4, field))[0]
        return value

    @property
    def offset(self) -> int:
        return self._offset

    def finish(self, *, allow_zero_padding: bool = False) -> None:
        rest = self._data[self._offset :]
        if allow_zero_padding and not any(rest):
            return
        if rest:
            raise VerificationError(f"{self._what}: {len(self._data) - self._offset} unexpected trailing bytes")


def quote_tee(raw: bytes) -> str | None:
    """Return "sgx" or "tdx" when the header looks like a DCAP quote we support, else None."""
    if len(raw) < HEADER_BYTES:
        return None
    version, _key_type, tee_type = struct.unpack_from("<HHI", raw, 0)
    if version == 3 and tee_type == TEE_TYPE_SGX:
        return "sgx"
    if version in (4, 5) and tee_type == TEE_TYPE_TDX:
        return "tdx"
    return None


def parse_quote(raw: bytes) -> UnverifiedQuote:
    """Split a DCAP quote into its parts, refusing anything outside the supported layouts."""
    reader = _Reader(raw, "DCAP quote")
    header = reader.take(HEADER_BYTES, "header")
    version, key_type, tee_type = struct.unpack_from("<HHI", header, 0)
    tee = quote_tee(header)
    if tee is None:
        raise VerificationError(
            f"DCAP quote: unsupported version {version} with TEE type {tee_type:#x} (supported: SGX v3, TDX v4 and v5)"
        )
    if key_type != ATT_KEY_ECDSA_P256:
        raise VerificationError(f"DCAP quote: attestation key type {key_type} is not ECDSA P-256 (2)")
    if version == 3:
        body = reader.take(SGX_REPORT_BYTES, "SGX report body")
    elif version == 4:
        body = reader.take(TD_REPORT_10_BYTES, "TD report")
    else:
        body_type = reader.u16("v5 body type")
        body_size = reader.u32("v5 body size")
        expected = {V5_BODY_TD10: TD_REPORT_10_BYTES, V5_BODY_TD15: TD_REPORT_15_BYTES}
        if expected.get(body_type) != body_size:
            raise VerificationError(
                f"DCAP quote v5: body type {body_type} of {body_size} bytes is not a TD "
                "report 1.0 (type 2, 584 bytes) or 1.5 (type 3, 648 bytes)"
            )
        body = reader.take(body_size, "TD report")
    signed = raw[: reader.offset]
    signature_length = reader.u32("signature data length")
    signature_data = reader.take(signature_length, "signature data")
    reader.finish(allow_zero_padding=True)

    sig_reader = _Reader(signature_data, "DCAP quote signature data")
    isv_signature = sig_reader.take(ECDSA_P256_SIG_BYTES, "report signature")
    attestation_key = sig_reader.take(ECDSA_P256_KEY_BYTES, "attestation key")
    if version == 3:
        certification = sig_reader
    else:
        outer_type = sig_reader.u16("certification data type")
        if outer_type != CERT_TYPE_QE_REPORT:
            raise VerificationError(f"DCAP quote: certification data type {outer_type} is not 6 (QE report)")
        outer_size = sig_reader.u32("certification data size")
        certification = _Reader(
            sig_reader.take(outer_size, "QE report certification data"),
            "DCAP quote QE report certification data",
        )
        sig_reader.finish()
    qe_report = certification.take(SGX_REPORT_BYTES, "QE report")
    qe_report_signature = certification.take(ECDSA_P256_SIG_BYTES, "QE report signature")
    qe_auth_data = certification.take(certification.u16("QE auth data size"), "QE auth data")
    cert_type = certification.u16("PCK certification data type")
    if cert_type != CERT_TYPE_PCK_CHAIN:
        raise VerificationError(
            f"DCAP quote: PCK certification data type {cert_type} is not supported "
            "(only 5: the PCK certificate chain embedded in the quote)"
        )
    pck_chain_pem = certification.take(certification.u32("PCK chain size"), "PCK chain")
    certification.finish()
    return UnverifiedQuote(
        version=version,
        tee=tee,
        qe_vendor_id=header[12:28],
        body=body,
        signed=signed,
        isv_signature=isv_signature,
        attestation_key=attestation_key,
        qe_report=qe_report,
        qe_report_signature=qe_report_signature,
        qe_auth_data=qe_auth_data,
        pck_chain_pem=pck_chain_pem,
    )
