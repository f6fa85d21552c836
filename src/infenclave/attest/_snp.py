"""AMD SEV-SNP attestation reports: structure, then the VCEK chain and report signature.

Report layout: AMD "SEV Secure Nested Paging Firmware ABI Specification" (pub. 56860),
table "ATTESTATION_REPORT Structure"; 0x4A0 = 1184 bytes, little-endian:

    0x000 VERSION u32          0x008 POLICY u64 (bit 19 DEBUG)   0x030 VMPL u32
    0x034 SIGNATURE_ALGO u32 (1 = ECDSA P-384 with SHA-384)     0x038 CURRENT_TCB u64
    0x050 REPORT_DATA [64]     0x090 MEASUREMENT [48]            0x0C0 HOST_DATA [32]
    0x180 REPORTED_TCB u64     0x1A0 CHIP_ID [64]                0x2A0 SIGNATURE [512]
    signature: R at 0x2A0 and S at 0x2E8, 72-byte little-endian fields, over bytes 0..0x2A0

TCB_VERSION (Milan/Genoa): byte 0 BOOT_LOADER, 1 TEE, 6 SNP, 7 MICROCODE.

Chain (AMD KDS, "VCEK certificate and KDS interface specification", pub. 57230):
ARK (self-signed, pinned) -> ASK -> VCEK, each RSASSA-PSS with SHA-384, MGF1-SHA-384 and a
48-byte salt; the VCEK carries the chip id and the TCB it was derived for as extensions,
which must equal the report's CHIP_ID and REPORTED_TCB.

Verification steps (`verify_snp`):
    S1. The ARK is byte-identical to the pinned AMD ARK-Milan and signs itself.
    S2. The ASK is issued and signed by the ARK.
    S3. The VCEK is issued and signed by the ASK and holds a P-384 key.
    S4. All three certificates are valid at `now`.
    S5. The report's signature verifies under the VCEK key.
    S6. The VCEK's hwID and TCB extensions equal the report's CHIP_ID and REPORTED_TCB.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from infenclave.attest._roots import amd_ark_milan
from infenclave.attest._x509 import check_validity, load_pem_certificates
from infenclave.attest.claims import Claims
from infenclave.errors import VerificationError

__all__ = [
    "SNP_REPORT_BYTES",
    "SNP_CERT_GUIDS",
    "SnpCertificates",
    "certificates_from_table",
    "UnverifiedSnpReport",
    "looks_like_snp_report",
    "parse_snp_certificates",
    "parse_snp_report",
    "snp_claims",
    "verify_snp",
]

SNP_REPORT_BYTES = 0x4A0
SUPPORTED_VERSIONS = (2, 3, 4, 5)  # fields used here sit at the same offsets in all of them
SIG_ALGO_ECDSA_P384_SHA384 = 1
POLICY_DEBUG_BIT = 1 << 19

_OFF_VERSION = 0x000
_OFF_GUEST_SVN = 0x004
_OFF_POLICY = 0x008
_OFF_VMPL = 0x030
_OFF_SIG_ALGO = 0x034
_OFF_REPORT_DATA = 0x050
_OFF_MEASUREMENT = 0x090
_OFF_HOST_DATA = 0x0C0
_OFF_REPORTED_TCB = 0x180
_OFF_CHIP_ID = 0x1A0
_OFF_SIGNATURE = 0x2A0
_SIG_COMPONENT_BYTES = 72

# VCEK extensions (KDS spec, table "VCEK Certificate Extensions").
_OID_BL_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.1")
_OID_TEE_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.2")
_OID_SNP_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.3")
_OID_UCODE_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.8")
_OID_HWID = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.4")
# (extension, index of that component in the 8-byte TCB_VERSION)
_TCB_COMPONENTS = (
    ("bootloader", _OID_BL_SPL, 0),
    ("tee", _OID_TEE_SPL, 1),
    ("snp", _OID_SNP_SPL, 6),
    ("microcode", _OID_UCODE_SPL, 7),
)
_PSS_SHA384 = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
_MAX_CERTIFICATES_BYTES = 64 * 1024
_STEP = "step 2 (SEV-SNP chain)"


@dataclass(frozen=True)
class UnverifiedSnpReport:
    """An SEV-SNP report split into fields. NOT verified."""

    raw: bytes
    version: int
    guest_svn: int
    policy: int
    vmpl: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    reported_tcb: bytes
    chip_id: bytes

    @property
    def signed(self) -> bytes:
        """The bytes the VCEK signs."""
        return self.raw[:_OFF_SIGNATURE]

    @property
    def signature(self) -> tuple[int, int]:
        """(r, s) of the ECDSA signature, decoded from their little-endian fields."""
        r_start, s_start = _OFF_SIGNATURE, _OFF_SIGNATURE + _SIG_COMPONENT_BYTES
        r = self.raw[r_start : r_start + _SIG_COMPONENT_BYTES]
        s = self.raw[s_start : s_start + _SIG_COMPONENT_BYTES]
        return int.from_bytes(r, "little"), int.from_bytes(s, "little")


@dataclass(frozen=True)
class SnpCertificates:
    """The VCEK and its ASK/ARK chain. NOT verified."""

    vcek: x509.Certificate
    ask: x509.Certificate
    ark: x509.Certificate


def looks_like_snp_report(raw: bytes) -> bool:
    """True when `raw` has the size, version and signature algorithm of an SNP report."""
    if len(raw) != SNP_REPORT_BYTES:
        return False
    version = struct.unpack_from("<I", raw, _OFF_VERSION)[0]
    sig_algo = struct.unpack_from("<I", raw, _OFF_SIG_ALGO)[0]
    return version in SUPPORTED_VERSIONS and sig_algo == SIG_ALGO_ECDSA_P384_SHA384


def parse_snp_report(raw: bytes) -> UnverifiedSnpReport:
    """Split an SEV-SNP report into fields, refusing wrong sizes, versions and algorithms."""
    if len(raw) != SNP_REPORT_BYTES:
        raise VerificationError(f"SEV-SNP report is {len(raw)} bytes, expected {SNP_REPORT_BYTES}")
    version = struct.unpack_from("<I", raw, _OFF_VERSION)[0]
    if version not in SUPPORTED_VERSIONS:
        raise VerificationError(f"SEV-SNP report version {version} is not supported")
    sig_algo = struct.unpack_from("<I", raw, _OFF_SIG_ALGO)[0]
    if sig_algo != SIG_ALGO_ECDSA_P384_SHA384:
        raise VerificationError(f"SEV-SNP report signature algorithm {sig_algo} is not ECDSA P-384 SHA-384 (1)")
    return UnverifiedSnpReport(
        raw=raw,
        version=version,
        guest_svn=struct.unpack_from("<I", raw, _OFF_GUEST_SVN)[0],
        policy=struct.unpack_from("<Q", raw, _OFF_POLICY)[0],
        vmpl=struct.unpack_from("<I", raw, _OFF_VMPL)[0],
        report_data=raw[_OFF_REPORT_DATA : _OFF_REPORT_DATA + 64],
        measurement=raw[_OFF_MEASUREMENT : _OFF_MEASUREMENT + 48],
        host_data=raw[_OFF_HOST_DATA : _OFF_HOST_DATA + 32],
        reported_tcb=raw[_OFF_REPORTED_TCB : _OFF_REPORTED_TCB + 8],
        chip_id=raw[_OFF_CHIP_ID : _OFF_CHIP_ID + 64],
    )


def parse_snp_certificates(data: bytes) -> SnpCertificates:
    """Parse the PEM bundle VCEK, ASK, ARK (in that order, leaf first)."""
    if len(data) > _MAX_CERTIFICATES_BYTES:
        raise VerificationError(f"SEV-SNP certificates: {len(data)} bytes, over the {_MAX_CERTIFICATES_BYTES} limit")
    certificates = load_pem_certificates(data, "SEV-SNP certificates")
    if len(certificates) != 3:
        raise VerificationError(
            f"SEV-SNP certificates: expected VCEK, ASK and ARK, got {len(certificates)} certificates"
        )
    vcek, ask, ark = certificates
    return SnpCertificates(vcek=vcek, ask=ask, ark=ark)


#: GUIDs of the SNP certificate table (GHCB spec, "SNP Extended Guest Request"; the table
#: configfs-tsm returns as ``auxblob``), in RFC 4122 byte order as go-sev-guest reads them.
SNP_CERT_GUIDS = {
    "vcek": "63da758d-e664-4564-adc5-f4b93be8accd",
    "ask": "4ab7b379-bbac-4fe4-a02f-05aef327c782",
    "ark": "c0b406a4-a803-4952-9743-3fb6014cd0ae",
}
_CERT_ENTRY = struct.Struct("<16sII")  # guid, offset (from the table's start), length


def certificates_from_table(table: bytes) -> bytes:
    """Turn an SNP certificate table (entries ended by an all-zero one, DER certificates) into
    the PEM bundle VCEK, ASK, ARK that `parse_snp_certificates` reads. Structure only: the
    chain is verified by `verify_snp` like any other."""
    import uuid

    if len(table) > _MAX_CERTIFICATES_BYTES:
        raise VerificationError("SEV-SNP certificate table: over the size limit")
    by_guid: dict[str, bytes] = {}
    for index in range(64):
        start = index * _CERT_ENTRY.size
        if start + _CERT_ENTRY.size > len(table):
            raise VerificationError("SEV-SNP certificate table: no terminating entry")
        guid, offset, length = _CERT_ENTRY.unpack_from(table, start)
        if guid == bytes(16):
            break
        if offset + length > len(table) or length == 0:
            raise VerificationError("SEV-SNP certificate table: an entry points outside the table")
        by_guid[str(uuid.UUID(bytes=guid))] = table[offset : offset + length]
    pem = b""
    for name, guid in SNP_CERT_GUIDS.items():
        if guid not in by_guid:
            raise VerificationError(f"SEV-SNP certificate table: no {name.upper()} certificate")
        try:
            certificate = x509.load_der_x509_certificate(by_guid[guid])
        except ValueError as exc:
            raise VerificationError(f"SEV-SNP certificate table: the {name.upper()} is not DER") from exc
        pem += certificate.public_bytes(Encoding.PEM)
    return pem


def verify_snp(report: UnverifiedSnpReport, certificates: SnpCertificates, now: datetime) -> None:
    """Run steps S1-S6 above; raise `VerificationError` naming the first that fails."""
    step = _STEP
    # S1. The ARK is the pinned AMD root, and signs itself.
    pinned = amd_ark_milan()
    if certificates.ark.public_bytes(Encoding.DER) != pinned.public_bytes(Encoding.DER):
        raise VerificationError(f"{step}: the ARK is not the pinned AMD ARK-Milan root")
    _verify_pss(pinned, pinned, f"{step}: ARK self-signature")
    # S2, S3. ASK by ARK, VCEK by ASK.
    _verify_pss(certificates.ask, pinned, f"{step}: ASK signature by the ARK")
    _verify_pss(certificates.vcek, certificates.ask, f"{step}: VCEK signature by the ASK")
    vcek_key = certificates.vcek.public_key()
    if not isinstance(vcek_key, ec.EllipticCurvePublicKey) or vcek_key.curve.name != "secp384r1":
        raise VerificationError(f"{step}: the VCEK key is not ECDSA P-384")
    # S4. Validity at `now`.
    chain = ((pinned, "ARK"), (certificates.ask, "ASK"), (certificates.vcek, "VCEK"))
    for certificate, name in chain:
        try:
            check_validity(certificate, now, name)
        except VerificationError as exc:
            raise VerificationError(f"{step}: {exc}") from exc
    # S5. The report signature.
    r, s = report.signature
    try:
        vcek_key.verify(encode_dss_signature(r, s), report.signed, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature as exc:
        raise VerificationError(
            "step 2 (SEV-SNP report signature): the report's signature does not verify under "
            "the VCEK: the report was altered or signed by another chip"
        ) from exc
    # S6. The VCEK was issued for this chip at this TCB.
    hwid = _extension_bytes(certificates.vcek, _OID_HWID)
    if hwid[:2] == b"\x04\x40" and len(hwid) == 66:  # some KDS versions DER-wrap it
        hwid = hwid[2:]
    if not hmac.compare_digest(hwid, report.chip_id):
        raise VerificationError(f"{step}: the VCEK was issued for another chip (hwID differs)")
    for name, oid, index in _TCB_COMPONENTS:
        value = _der_small_int(_extension_bytes(certificates.vcek, oid), name)
        if value != report.reported_tcb[index]:
            raise VerificationError(
                f"{step}: the VCEK's {name} SPL {value} differs from the report's "
                f"REPORTED_TCB ({report.reported_tcb[index]})"
            )


def snp_claims(report: UnverifiedSnpReport) -> Claims:
    """Claims of a report that `verify_snp` has just authenticated."""
    tcb = report.reported_tcb
    return Claims(
        tee="sev-snp",
        measurements={
            "measurement": report.measurement.hex(),
            "host_data": report.host_data.hex(),
            "vmpl": str(report.vmpl),
        },
        debug=bool(report.policy & POLICY_DEBUG_BIT),
        tcb_status=None,
        advisory_ids=(),
        report_data=report.report_data,
        details={
            "report_version": str(report.version),
            "policy": f"{report.policy:#x}",
            "vmpl": str(report.vmpl),
            "guest_svn": str(report.guest_svn),
            "reported_tcb": tcb.hex(),
            "reported_tcb_components": (f"bootloader={tcb[0]} tee={tcb[1]} snp={tcb[6]} microcode={tcb[7]}"),
            "host_data": report.host_data.hex(),
            "chip_id": report.chip_id.hex(),
        },
    )


def _verify_pss(certificate: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    """Check issuer name and the RSASSA-PSS SHA-384 signature AMD uses on every chain link."""
    if certificate.issuer != issuer.subject:
        raise VerificationError(f"{what}: issuer name does not match")
    is_pss = certificate.signature_algorithm_oid == x509.SignatureAlgorithmOID.RSASSA_PSS
    if not is_pss or not isinstance(certificate.signature_hash_algorithm, hashes.SHA384):
        raise VerificationError(f"{what}: not an RSASSA-PSS SHA-384 signature")
    issuer_key = issuer.public_key()
    if not isinstance(issuer_key, rsa.RSAPublicKey):
        raise VerificationError(f"{what}: the issuer key is not RSA")
    try:
        issuer_key.verify(certificate.signature, certificate.tbs_certificate_bytes, _PSS_SHA384, hashes.SHA384())
    except InvalidSignature as exc:
        raise VerificationError(f"{what} is invalid") from exc


def _extension_bytes(certificate: x509.Certificate, oid: x509.ObjectIdentifier) -> bytes:
    try:
        extension = certificate.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound as exc:
        raise VerificationError(f"{_STEP}: the VCEK lacks extension {oid.dotted_string}") from exc
    value = extension.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise VerificationError(f"{_STEP}: unexpected VCEK extension {oid.dotted_string}")
    return value.value


def _der_small_int(encoded: bytes, name: str) -> int:
    """Decode a DER INTEGER holding a security patch level (0..255)."""
    if len(encoded) < 3 or encoded[0] != 0x02 or encoded[1] != len(encoded) - 2 or encoded[1] > 2:
        raise VerificationError(f"{_STEP}: the VCEK's {name} SPL is not a small DER integer")
    value = int.from_bytes(encoded[2:], "big", signed=True)
    if not 0 <= value <= 255:
        raise VerificationError(f"{_STEP}: the VCEK's {name} SPL {value} is out of range")
    return value
