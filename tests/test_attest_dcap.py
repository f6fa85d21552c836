"""SGX and TDX DCAP verification against the real quotes and collateral in tests/data/evidence.

Times are pinned as the evidence README says: collateral expires, so each quote is verified
at its documented moment, and again at today's date where it must be refused.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import dcap_qvl
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from infenclave.attest import Evidence, Measurements, Policy, PolicyRefusal, load_evidence_file, verify
from infenclave.attest._roots import intel_sgx_root_ca
from infenclave.errors import VerificationError

EVIDENCE = Path(__file__).resolve().parent / "data" / "evidence"
SGX_QUOTE = EVIDENCE / "sgx" / "sgx_quote"
SGX_COLLATERAL = EVIDENCE / "sgx" / "sgx_quote_collateral.json"
SGX_DEBUG_QUOTE = EVIDENCE / "sgx" / "sgx_quote_debug_enclave.bin"
TDX_QUOTE = EVIDENCE / "tdx" / "tdx_quote"
TDX_COLLATERAL = EVIDENCE / "tdx" / "tdx_quote_collateral.json"
TDX_OUTDATED = EVIDENCE / "tdx" / "tdx_quote_outdated"
TDX_OUTDATED_COLLATERAL = EVIDENCE / "tdx" / "tdx_quote_outdated_collateral.json"

SGX_AT = datetime(2025, 6, 19, 11, 56, 11, tzinfo=UTC)
TDX_AT = datetime(2025, 6, 19, 11, 16, 3, tzinfo=UTC)
TDX_OUTDATED_AT = datetime(2026, 2, 18, 11, 58, 51, tzinfo=UTC)

SGX_MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
SGX_MRSIGNER = "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
SGX_REPORT_DATA = b"Hello, world!".ljust(64, b"\x00")
TDX_MRTD = "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7"
DEBUG_MRENCLAVE = "4000659c8f1c3094f9eefa7fb9ccc5bdb21b6f2893cdb5081f179e737d0c7247"

# Offsets inside an SGX quote v3: 48-byte header, then the 384-byte report body.
MRENCLAVE_OFFSET = 48 + 64
REPORT_DATA_OFFSET = 48 + 320
QE_REPORT_OFFSET = 48 + 384 + 4 + 64 + 64


def sgx_policy(**overrides: object) -> Policy:
    """A policy listing the sample SGX quote's real identity and TCB status."""
    fields: dict[str, object] = {
        "tee_types": ("sgx",),
        "measurements": Measurements(mrenclave=(SGX_MRENCLAVE,), mrsigner=(SGX_MRSIGNER,)),
        "tcb_statuses": ("ConfigurationAndSWHardeningNeeded",),
    }
    fields.update(overrides)
    return Policy(**fields)  # type: ignore[arg-type]


# RTMR0-3 of the sample TDX quote (a TDX policy must pin them besides MRTD).
TDX_RTMRS = {
    "rtmr0": "44c0197b39157fdd7a4dcc44767f9d6b0bb3977c7a8e347b8492f827fe9d9e5c48aca29b220b80b6a540cf994b9bc9c0",
    "rtmr1": "0084452c01668329d4bc06acdf58a7205c26743304509973949e5619bf81a6a7aea8c323c173019b3093d54e579e9378",
    "rtmr2": "d833feef2cd945148aa38ead2c53e9b7f138190aaaebfc551dccd829fc207aa3ba80b70870d7330733642e01d48c3132",
    "rtmr3": "00" * 48,
}


def tdx_policy() -> Policy:
    return Policy(
        tee_types=("tdx",), measurements=Measurements(mrtd=(TDX_MRTD,), **{k: (v,) for k, v in TDX_RTMRS.items()})
    )


def flipped(data: bytes, offset: int, bit: int = 0) -> bytes:
    mutable = bytearray(data)
    mutable[offset] ^= 1 << bit
    return bytes(mutable)


# --- accepted at the pinned times -----------------------------------------------------------


def test_sgx_quote_accepted_with_documented_tcb_status() -> None:
    evidence = load_evidence_file(SGX_QUOTE, SGX_COLLATERAL)
    assert evidence.tee == "sgx"
    claims = verify(evidence, sgx_policy(), expected_report_data=SGX_REPORT_DATA, now=SGX_AT)
    assert claims.tee == "sgx"
    assert claims.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert claims.advisory_ids == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert claims.debug is False
    assert claims.measurements["mrenclave"] == SGX_MRENCLAVE
    assert claims.measurements["mrsigner"] == SGX_MRSIGNER
    assert claims.measurements["isv_prod_id"] == "0"
    assert claims.report_data == SGX_REPORT_DATA
    # Our parse of the body agrees with dcap-qvl's own parser.
    theirs = dcap_qvl.parse_quote(SGX_QUOTE.read_bytes()).report
    assert claims.measurements["mrenclave"] == theirs.mr_enclave.hex()
    assert claims.measurements["mrsigner"] == theirs.mr_signer.hex()
    assert claims.report_data == theirs.report_data


def test_tdx_quote_accepted_up_to_date() -> None:
    evidence = load_evidence_file(TDX_QUOTE, TDX_COLLATERAL)
    assert evidence.tee == "tdx"
    claims = verify(evidence, tdx_policy(), expected_report_data=None, now=TDX_AT)
    assert claims.tcb_status == "UpToDate"
    assert claims.advisory_ids == ()
    assert claims.debug is False
    theirs = dcap_qvl.parse_quote(TDX_QUOTE.read_bytes()).report
    assert claims.measurements["mrtd"] == theirs.mr_td.hex() == TDX_MRTD
    assert claims.measurements["rtmr0"] == theirs.rt_mr0.hex()
    assert claims.measurements["rtmr3"] == theirs.rt_mr3.hex()
    assert claims.report_data == theirs.report_data


def test_claims_are_read_only_and_serialisable() -> None:
    claims = verify(load_evidence_file(TDX_QUOTE, TDX_COLLATERAL), None, expected_report_data=None, now=TDX_AT)
    with pytest.raises(TypeError):
        claims.measurements["mrtd"] = "00"  # type: ignore[index]
    document = claims.to_json_dict()
    assert document["tcb_status"] == "UpToDate" and document["measurements"]["mrtd"] == TDX_MRTD
    assert document["report_data"] == claims.report_data.hex()


# --- refused: tampering, expiry, TCB ---------------------------------------------------------


@pytest.mark.parametrize(
    "offset", [MRENCLAVE_OFFSET, MRENCLAVE_OFFSET + 31, REPORT_DATA_OFFSET, REPORT_DATA_OFFSET + 63]
)
@pytest.mark.parametrize("bit", [0, 7])
def test_sgx_one_flipped_bit_refused(offset: int, bit: int) -> None:
    good = load_evidence_file(SGX_QUOTE, SGX_COLLATERAL)
    evidence = Evidence("sgx", flipped(good.raw, offset, bit), collateral=good.collateral)
    with pytest.raises(VerificationError, match=r"step 2 .*signature is invalid") as info:
        verify(evidence, sgx_policy(), expected_report_data=None, now=SGX_AT)
    assert not isinstance(info.value, PolicyRefusal)
    assert isinstance(info.value.__cause__, ValueError)  # dcap-qvl's reason is kept


@pytest.mark.parametrize(
    ("quote", "collateral", "policy"),
    [(SGX_QUOTE, SGX_COLLATERAL, sgx_policy), (TDX_QUOTE, TDX_COLLATERAL, tdx_policy)],
)
def test_collateral_expired_today(quote: Path, collateral: Path, policy: object) -> None:
    evidence = load_evidence_file(quote, collateral)
    with pytest.raises(VerificationError, match=r"expired") as info:
        verify(evidence, policy(), expected_report_data=None, now=datetime.now(UTC))  # type: ignore[operator]
    assert "step 2" in str(info.value)


def test_tdx_outdated_no_matching_tcb_level() -> None:
    evidence = load_evidence_file(TDX_OUTDATED, TDX_OUTDATED_COLLATERAL)
    assert evidence.tee == "tdx"
    with pytest.raises(VerificationError, match="No matching TCB level"):
        verify(evidence, tdx_policy(), expected_report_data=None, now=TDX_OUTDATED_AT)


def test_tcb_status_not_in_policy_refused_with_reason() -> None:
    evidence = load_evidence_file(SGX_QUOTE, SGX_COLLATERAL)
    policy = sgx_policy(tcb_statuses=("UpToDate",))
    with pytest.raises(PolicyRefusal) as info:
        verify(evidence, policy, expected_report_data=None, now=SGX_AT)
    message = str(info.value)
    assert "TCB status ConfigurationAndSWHardeningNeeded is not accepted by the policy (accepted: UpToDate" in message
    assert "INTEL-SA-00289" in message
    assert info.value.claims.tcb_status == "ConfigurationAndSWHardeningNeeded"


def test_wrong_measurement_refused() -> None:
    evidence = load_evidence_file(SGX_QUOTE, SGX_COLLATERAL)
    policy = sgx_policy(measurements=Measurements(mrenclave=("ab" * 32,)))
    with pytest.raises(PolicyRefusal, match=r"step 3e .*mrenclave 33d8736d"):
        verify(evidence, policy, expected_report_data=None, now=SGX_AT)
    # mrsigner alone is also enforced when it is the only list.
    policy = sgx_policy(measurements=Measurements(mrsigner=("cd" * 32,)))
    with pytest.raises(PolicyRefusal, match=r"mrsigner"):
        verify(evidence, policy, expected_report_data=None, now=SGX_AT)


def test_report_data_mismatch_refused() -> None:
    evidence = load_evidence_file(SGX_QUOTE, SGX_COLLATERAL)
    wrong = b"Hello, world?".ljust(64, b"\x00")
    with pytest.raises(PolicyRefusal, match=r"step 4 \(report data\)"):
        verify(evidence, sgx_policy(), expected_report_data=wrong, now=SGX_AT)


def test_tee_type_not_accepted() -> None:
    evidence = load_evidence_file(TDX_QUOTE, TDX_COLLATERAL)
    with pytest.raises(PolicyRefusal, match=r"step 3a .*tdx evidence is not accepted"):
        verify(evidence, sgx_policy(), expected_report_data=None, now=TDX_AT)


# --- the debug enclave, and quotes without collateral ----------------------------------------


def test_debug_enclave_chain_verifies_without_collateral() -> None:
    """No collateral exists for it: what the quote carries (chain to the pinned Intel root,
    QE report, attestation key binding, quote signature) is checked, and it is genuine."""
    evidence = load_evidence_file(SGX_DEBUG_QUOTE)
    claims = verify(evidence, None, expected_report_data=None, now=SGX_AT)
    assert claims.debug is True
    assert claims.measurements["mrenclave"] == DEBUG_MRENCLAVE
    assert claims.tcb_status is None
    assert claims.details["attributes"].startswith("07")
    assert "ABSENT" in claims.details["collateral"]


def test_debug_enclave_refused_by_default_policy() -> None:
    evidence = load_evidence_file(SGX_DEBUG_QUOTE)
    # A policy that lists its very measurement and every TCB status still refuses: debug.
    policy = Policy(
        tee_types=("sgx",),
        measurements=Measurements(mrenclave=(DEBUG_MRENCLAVE,)),
        tcb_statuses=("UpToDate", "SWHardeningNeeded", "ConfigurationAndSWHardeningNeeded"),
    )
    assert policy.allow_debug is False
    with pytest.raises(PolicyRefusal, match=r"step 3c \(debug\).*DEBUG") as info:
        verify(evidence, policy, expected_report_data=None, now=SGX_AT)
    assert info.value.claims.debug is True


def test_debug_enclave_allowed_debug_still_needs_collateral() -> None:
    evidence = load_evidence_file(SGX_DEBUG_QUOTE)
    policy = Policy(tee_types=("sgx",), measurements=Measurements(mrenclave=(DEBUG_MRENCLAVE,)), allow_debug=True)
    with pytest.raises(PolicyRefusal, match=r"step 3d \(TCB\): no collateral"):
        verify(evidence, policy, expected_report_data=None, now=SGX_AT)


@pytest.mark.parametrize(
    ("offset", "reason"),
    [
        (MRENCLAVE_OFFSET, "quote signature is invalid"),
        (REPORT_DATA_OFFSET + 5, "quote signature is invalid"),
        (QE_REPORT_OFFSET + 130, "QE report signature is invalid"),
    ],
)
def test_debug_enclave_tampered_refused_without_collateral(offset: int, reason: str) -> None:
    raw = flipped(SGX_DEBUG_QUOTE.read_bytes(), offset)
    with pytest.raises(VerificationError, match=reason):
        verify(Evidence("sgx", raw), None, expected_report_data=None, now=SGX_AT)


@pytest.mark.parametrize(("quote", "now"), [(SGX_QUOTE, SGX_AT), (TDX_QUOTE, TDX_AT), (TDX_OUTDATED, TDX_OUTDATED_AT)])
def test_quote_without_collateral_never_accepted(quote: Path, now: datetime) -> None:
    evidence = load_evidence_file(quote)
    claims = verify(evidence, None, expected_report_data=None, now=now)
    assert claims.tcb_status is None
    kinds = ["mrenclave"] if claims.tee == "sgx" else ["mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"]
    policy = Policy(
        tee_types=(claims.tee,),
        measurements=Measurements(**{kind: (claims.measurements[kind],) for kind in kinds}),
        tcb_statuses=("UpToDate", "ConfigurationAndSWHardeningNeeded", "OutOfDate"),
    )
    with pytest.raises(PolicyRefusal, match="no collateral"):
        verify(evidence, policy, expected_report_data=None, now=now)


def test_pck_certificate_validity_checked_without_collateral() -> None:
    # The outdated quote's PCK certificate was issued on 2026-01-23.
    with pytest.raises(VerificationError, match="PCK certificate is not valid before 2026-01-23"):
        verify(load_evidence_file(TDX_OUTDATED), None, expected_report_data=None, now=SGX_AT)


# --- structure and trust anchor --------------------------------------------------------------


def test_pinned_intel_root_is_the_published_one() -> None:
    der = intel_sgx_root_ca().public_bytes(Encoding.DER)
    assert der == (EVIDENCE / "sgx" / "TrustedRootCA.der").read_bytes()
    assert hashlib.sha256(der).hexdigest() == ("44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3")


def test_trailing_data_refused_zero_padding_tolerated() -> None:
    raw = SGX_QUOTE.read_bytes()
    assert Evidence("sgx", raw + bytes(16)).raw.endswith(bytes(16))
    with pytest.raises(VerificationError, match="trailing"):
        Evidence("sgx", raw + b"\x01")


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\x00" * 10, b"\x03\x00\x02\x00" + bytes(60), SGX_QUOTE.read_bytes()[:500], b"hello world"],
)
def test_garbage_refused_at_parse(garbage: bytes, tmp_path: Path) -> None:
    with pytest.raises(VerificationError):
        Evidence("sgx", garbage)
    path = tmp_path / "evidence.bin"
    path.write_bytes(garbage)
    with pytest.raises(VerificationError):
        load_evidence_file(path)


def test_tee_tag_must_match_header() -> None:
    with pytest.raises(VerificationError, match="tagged 'tdx'"):
        Evidence("tdx", SGX_QUOTE.read_bytes())
    with pytest.raises(VerificationError, match="unknown TEE type"):
        Evidence("sgx-ish", SGX_QUOTE.read_bytes())


def test_oversized_collateral_refused() -> None:
    with pytest.raises(VerificationError, match="collateral is .* over the"):
        Evidence("sgx", SGX_QUOTE.read_bytes(), collateral=b" " * (1024 * 1024 + 1))


def test_garbage_collateral_refused_with_step() -> None:
    evidence = Evidence("sgx", SGX_QUOTE.read_bytes(), collateral=b'{"not": "collateral"}')
    with pytest.raises(VerificationError, match=r"step 2 \(DCAP collateral\)"):
        verify(evidence, sgx_policy(), expected_report_data=None, now=SGX_AT)


def test_envelope_round_trip() -> None:
    evidence = load_evidence_file(SGX_QUOTE, SGX_COLLATERAL)
    again = Evidence.from_json(evidence.to_json())
    assert again == evidence
    claims = verify(again, sgx_policy(), expected_report_data=SGX_REPORT_DATA, now=SGX_AT)
    assert claims.tcb_status == "ConfigurationAndSWHardeningNeeded"


def test_envelope_file_loaded(tmp_path: Path) -> None:
    path = tmp_path / "evidence.json"
    path.write_bytes(Evidence("tdx", TDX_QUOTE.read_bytes()).to_json())
    evidence = load_evidence_file(path, TDX_COLLATERAL)  # collateral added from a file
    assert evidence.collateral == TDX_COLLATERAL.read_bytes()
    assert verify(evidence, tdx_policy(), expected_report_data=None, now=TDX_AT).tcb_status == "UpToDate"


def test_naive_time_is_a_programming_error() -> None:
    evidence = load_evidence_file(SGX_QUOTE, SGX_COLLATERAL)
    with pytest.raises(ValueError, match="timezone-aware"):
        verify(evidence, None, expected_report_data=None, now=datetime(2025, 6, 19, 11, 56, 11))
