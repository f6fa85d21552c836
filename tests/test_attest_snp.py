"""SEV-SNP verification against the real Milan report, VCEK and ASK/ARK in tests/data/evidence.

The sample report's guest policy is 0xb0000: bit 19 (DEBUG) is set, so a default policy
refuses it and acceptance needs `allow_debug`.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from infenclave.attest import Evidence, Measurements, Policy, PolicyRefusal, load_evidence_file, verify
from infenclave.attest._roots import amd_ark_milan
from infenclave.errors import VerificationError

EVIDENCE = Path(__file__).resolve().parent / "data" / "evidence"
REPORT = EVIDENCE / "snp" / "attestation.bin"
MEASUREMENT = "b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b6bdf8a9ece31a5a608eb0cf2e4872b01"
REPORT_DATA = bytes([1, 2, 3, 4, 5]).ljust(64, b"\x00")
NOW = datetime(2025, 6, 19, 12, 0, 0, tzinfo=UTC)  # within every certificate's validity
SIGNED_END = 0x2A0
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)

# The real VCEK has serial number 0, which cryptography 50 warns about when tests load it.
pytestmark = pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")


def snp_policy(measurement: str = MEASUREMENT, allow_debug: bool = True) -> Policy:
    return Policy(
        tee_types=("sev-snp",),
        measurements=Measurements(snp_measurement=(measurement,), snp_host_data=("00" * 32,)),
        allow_debug=allow_debug,
        snp_vmpls=(0,),
    )


@pytest.fixture(scope="module")
def evidence() -> Evidence:
    loaded = load_evidence_file(REPORT)  # finds vcek.der and ask_ark_milan.pem beside it
    assert loaded.tee == "sev-snp" and loaded.certificates is not None
    return loaded


def test_snp_accepted_with_right_measurement(evidence: Evidence) -> None:
    claims = verify(evidence, snp_policy(), expected_report_data=REPORT_DATA, now=NOW)
    assert claims.tee == "sev-snp"
    assert claims.measurements == {"measurement": MEASUREMENT, "host_data": "00" * 32, "vmpl": "0"}
    assert claims.report_data == REPORT_DATA
    assert claims.debug is True
    assert claims.tcb_status is None
    assert claims.details["reported_tcb"] == "0200000000000544"
    assert claims.details["reported_tcb_components"] == "bootloader=2 tee=0 snp=5 microcode=68"
    assert claims.details["policy"] == "0xb0000"


def test_snp_debug_guest_refused_by_default_policy(evidence: Evidence) -> None:
    with pytest.raises(PolicyRefusal, match=r"step 3c \(debug\)"):
        verify(evidence, snp_policy(allow_debug=False), expected_report_data=None, now=NOW)


def test_snp_wrong_measurement_refused(evidence: Evidence) -> None:
    wrong = MEASUREMENT[:-2] + "00"
    with pytest.raises(PolicyRefusal, match=r"step 3e .*snp_measurement"):
        verify(evidence, snp_policy(wrong), expected_report_data=None, now=NOW)


@pytest.mark.parametrize("offset", [0x08, 0x50, 0x90, 0x90 + 47, 0x180, 0x1A0, SIGNED_END - 1])
def test_snp_one_flipped_byte_in_body_refused(evidence: Evidence, offset: int) -> None:
    raw = bytearray(evidence.raw)
    raw[offset] ^= 0x01
    tampered = Evidence("sev-snp", bytes(raw), certificates=evidence.certificates)
    with pytest.raises(VerificationError, match=r"step 2 \(SEV-SNP report signature\)"):
        verify(tampered, snp_policy(), expected_report_data=None, now=NOW)


def test_snp_flipped_signature_refused(evidence: Evidence) -> None:
    raw = bytearray(evidence.raw)
    raw[SIGNED_END + 3] ^= 0x80
    tampered = Evidence("sev-snp", bytes(raw), certificates=evidence.certificates)
    with pytest.raises(VerificationError, match="signature does not verify"):
        verify(tampered, None, expected_report_data=None, now=NOW)


def test_snp_certificates_out_of_order_refused(evidence: Evidence) -> None:
    assert evidence.certificates is not None
    vcek, ask, ark = x509.load_pem_x509_certificates(evidence.certificates)
    swapped = b"".join(c.public_bytes(Encoding.PEM) for c in (vcek, ark, ask))
    with pytest.raises(VerificationError, match="not the pinned AMD ARK-Milan"):
        verify(Evidence("sev-snp", evidence.raw, certificates=swapped), None, expected_report_data=None, now=NOW)


def test_snp_vcek_expired_refused(evidence: Evidence) -> None:
    with pytest.raises(VerificationError, match="VCEK certificate expired"):
        verify(evidence, snp_policy(), expected_report_data=None, now=datetime(2030, 1, 1, tzinfo=UTC))


def test_snp_missing_certificates_refused(evidence: Evidence) -> None:
    with pytest.raises(VerificationError, match="no certificates"):
        verify(Evidence("sev-snp", evidence.raw), snp_policy(), expected_report_data=None, now=NOW)


def test_pinned_ark_is_the_shared_one() -> None:
    ark = x509.load_pem_x509_certificates((EVIDENCE / "snp" / "ask_ark_milan.pem").read_bytes())[1]
    assert ark.public_bytes(Encoding.DER) == amd_ark_milan().public_bytes(Encoding.DER)
    assert hashlib.sha256(ark.public_bytes(Encoding.DER)).hexdigest() == (
        "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd"
    )


# --- forged chains: a self-consistent chain that is not AMD's must be refused -----------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _vcek_certificate(
    vcek_key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: rsa.RSAPrivateKey, report: bytes
) -> x509.Certificate:
    """A VCEK look-alike carrying the report's chip id and TCB, signed RSA-PSS SHA-384."""
    tcb = report[0x180:0x188]

    def spl(oid: str, value: int) -> x509.Extension[x509.UnrecognizedExtension]:
        return x509.Extension(
            x509.ObjectIdentifier(oid),
            False,
            x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), bytes([2, 1, value])),
        )

    builder = (
        x509.CertificateBuilder()
        .subject_name(_name("SEV-VCEK"))
        .issuer_name(issuer)
        .public_key(vcek_key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
    )
    for oid, value in (
        ("1.3.6.1.4.1.3704.1.3.1", tcb[0]),
        ("1.3.6.1.4.1.3704.1.3.2", tcb[1]),
        ("1.3.6.1.4.1.3704.1.3.3", tcb[6]),
        ("1.3.6.1.4.1.3704.1.3.8", tcb[7]),
    ):
        extension = spl(oid, value)
        builder = builder.add_extension(extension.value, critical=False)
    hwid = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.4")
    builder = builder.add_extension(x509.UnrecognizedExtension(hwid, report[0x1A0:0x1E0]), critical=False)
    return builder.sign(signer, hashes.SHA384(), rsa_padding=PSS)


def _resign(report: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """Sign the report body with `key` as a VCEK would: r, s little-endian 72-byte fields."""
    r, s = decode_dss_signature(key.sign(report[:SIGNED_END], ec.ECDSA(hashes.SHA384())))
    signature = r.to_bytes(72, "little") + s.to_bytes(72, "little")
    return report[:SIGNED_END] + signature + report[SIGNED_END + len(signature) :]


def test_snp_forged_vcek_under_real_ask_refused(evidence: Evidence) -> None:
    """Real ARK and ASK, but a VCEK made by someone without the ASK key."""
    assert evidence.certificates is not None
    _, ask, ark = x509.load_pem_x509_certificates(evidence.certificates)
    fake_ask_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    vcek_key = ec.generate_private_key(ec.SECP384R1())
    vcek = _vcek_certificate(vcek_key, ask.subject, fake_ask_key, evidence.raw)
    report = _resign(evidence.raw, vcek_key)
    # The forgery is internally sound: the report does verify under the forged VCEK.
    r, s = int.from_bytes(report[0x2A0:0x2E8], "little"), int.from_bytes(report[0x2E8:0x330], "little")
    vcek_key.public_key().verify(encode_dss_signature(r, s), report[:SIGNED_END], ec.ECDSA(hashes.SHA384()))
    bundle = b"".join(c.public_bytes(Encoding.PEM) for c in (vcek, ask, ark))
    with pytest.raises(VerificationError, match="VCEK signature by the ASK is invalid"):
        verify(Evidence("sev-snp", report, certificates=bundle), snp_policy(), expected_report_data=None, now=NOW)


def test_snp_self_consistent_foreign_chain_refused(evidence: Evidence) -> None:
    """A complete ARK -> ASK -> VCEK chain with every signature valid, but not rooted at AMD."""
    ark_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ask_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    vcek_key = ec.generate_private_key(ec.SECP384R1())

    def ca(subject: str, issuer: str, key: rsa.RSAPrivateKey, signer: rsa.RSAPrivateKey) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(_name(subject))
            .issuer_name(_name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(days=1))
            .not_valid_after(NOW + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(signer, hashes.SHA384(), rsa_padding=PSS)
        )

    ark = ca("ARK-Milan", "ARK-Milan", ark_key, ark_key)
    ask = ca("SEV-Milan", "ARK-Milan", ask_key, ark_key)
    vcek = _vcek_certificate(vcek_key, ask.subject, ask_key, evidence.raw)
    report = _resign(evidence.raw, vcek_key)
    bundle = b"".join(c.public_bytes(Encoding.PEM) for c in (vcek, ask, ark))
    forged = Evidence("sev-snp", report, certificates=bundle)
    with pytest.raises(VerificationError, match="not the pinned AMD ARK-Milan"):
        verify(forged, snp_policy(), expected_report_data=None, now=NOW)


def test_snp_garbage_certificates_refused(evidence: Evidence) -> None:
    with pytest.raises(VerificationError, match="SEV-SNP certificates"):
        Evidence("sev-snp", evidence.raw, certificates=b"-----BEGIN CERTIFICATE-----\nxx\n")
    with pytest.raises(VerificationError, match="expected VCEK, ASK and ARK"):
        Evidence("sev-snp", evidence.raw, certificates=(EVIDENCE / "snp" / "ask_ark_milan.pem").read_bytes())


def test_snp_structure_checked(evidence: Evidence) -> None:
    with pytest.raises(VerificationError, match="1184"):
        Evidence("sev-snp", evidence.raw[:-1])
    bad_version = (99).to_bytes(4, "little") + evidence.raw[4:]
    with pytest.raises(VerificationError, match="version 99"):
        Evidence("sev-snp", bad_version)
