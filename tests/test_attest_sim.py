"""Simulated-TEE evidence: the shared wire format and its verification, with real Ed25519 keys."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from infenclave.attest import (
    Evidence,
    Measurements,
    Policy,
    PolicyRefusal,
    expected_report_data,
    sim_body_bytes,
    verify,
)
from infenclave.attest._sim import parse_sim_evidence
from infenclave.errors import PolicyError, VerificationError
from infenclave.protocol.sim_evidence import sim_evidence_bytes

NOW = datetime(2025, 6, 19, 12, 0, 0, tzinfo=UTC)
MEASUREMENT = hashlib.sha256(b"enclave program v1").hexdigest()
ENCLAVE_PUBLIC_KEY = bytes(range(32))
NONCE = b"n" * 32
MODEL_ID = hashlib.sha256(b"manifest").hexdigest()
REPORT_DATA = expected_report_data(ENCLAVE_PUBLIC_KEY, NONCE, MODEL_ID)


def public_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def make_sim(key: Ed25519PrivateKey, **overrides: Any) -> bytes:
    """Simulated evidence exactly as the enclave signs it, from the shared spec."""
    claims: dict[str, Any] = {
        "tee": "simulated",
        "measurement": MEASUREMENT,
        "report_data": REPORT_DATA.hex(),
        "debug": False,
        "issued_at": int(NOW.timestamp()) - 10,
        "signer": public_hex(key),
    }
    claims.update(overrides)
    body = json.dumps(claims, sort_keys=True, separators=(",", ":")).encode()
    return json.dumps(
        {
            "format": "infenclave-sim-evidence/1",
            "body": base64.b64encode(body).decode(),
            "signature": base64.b64encode(key.sign(body)).decode(),
        }
    ).encode()


def sim_policy(**overrides: Any) -> Policy:
    fields: dict[str, Any] = {
        "tee_types": ("simulated",),
        "measurements": Measurements(sim=(MEASUREMENT,)),
        "unsafe_allow_simulation": True,
    }
    fields.update(overrides)
    return Policy(**fields)


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def test_sim_accepted_when_allowed_and_warns(key: Ed25519PrivateKey, caplog: pytest.LogCaptureFixture) -> None:
    evidence = Evidence("simulated", make_sim(key))
    with caplog.at_level(logging.WARNING, logger="infenclave.attest.verifier"):
        claims = verify(evidence, sim_policy(), expected_report_data=REPORT_DATA, now=NOW)
    assert claims.tee == "simulated"
    assert claims.measurements == {"measurement": MEASUREMENT}
    assert claims.report_data == REPORT_DATA
    assert claims.details["signer"] == public_hex(key)
    assert any("SIMULATED" in record.getMessage() for record in caplog.records)


def test_sim_refused_by_a_policy_without_simulation(key: Ed25519PrivateKey) -> None:
    policy = Policy(tee_types=("sgx",), measurements=Measurements(mrenclave=("00" * 32,)))
    assert policy.unsafe_allows_simulation is False
    with pytest.raises(PolicyRefusal, match=r"step 3a .*does not allow simulation"):
        verify(Evidence("simulated", make_sim(key)), policy, expected_report_data=REPORT_DATA, now=NOW)


def test_simulated_tee_needs_the_unsafe_switch(key: Ed25519PrivateKey) -> None:
    # A release policy may pin the sim measurement and still refuse simulated evidence...
    policy = Policy(tee_types=("simulated",), measurements=Measurements(sim=(MEASUREMENT,)))
    with pytest.raises(PolicyRefusal, match="simulation"):
        verify(Evidence("simulated", make_sim(key)), policy, expected_report_data=REPORT_DATA, now=NOW)
    # ...and allowing simulation without accepting the tee type is a contradiction.
    with pytest.raises(PolicyError, match="allow_simulation"):
        Policy(tee_types=("sgx",), measurements=Measurements(mrenclave=("00" * 32,)), unsafe_allow_simulation=True)


@pytest.mark.parametrize(("age", "reason"), [(301, "issued 301 s ago"), (-120, "in the future")])
def test_sim_stale_or_future_refused(key: Ed25519PrivateKey, age: int, reason: str) -> None:
    raw = make_sim(key, issued_at=int(NOW.timestamp()) - age)
    with pytest.raises(PolicyRefusal, match=rf"step 3b \(freshness\).*{reason}"):
        verify(Evidence("simulated", raw), sim_policy(), expected_report_data=REPORT_DATA, now=NOW)


def test_sim_age_limit_comes_from_policy(key: Ed25519PrivateKey) -> None:
    raw = make_sim(key, issued_at=int(NOW.timestamp()) - 301)
    claims = verify(
        Evidence("simulated", raw), sim_policy(max_evidence_age_s=600), expected_report_data=REPORT_DATA, now=NOW
    )
    assert claims.details["issued_at"] == str(int(NOW.timestamp()) - 301)


def test_sim_report_data_mismatch_refused(key: Ed25519PrivateKey) -> None:
    other = expected_report_data(ENCLAVE_PUBLIC_KEY, b"m" * 32, MODEL_ID)
    with pytest.raises(PolicyRefusal, match=r"step 4 \(report data\)"):
        verify(Evidence("simulated", make_sim(key)), sim_policy(), expected_report_data=other, now=NOW)


def test_sim_bad_signature_refused(key: Ed25519PrivateKey) -> None:
    document = json.loads(make_sim(key))
    signature = bytearray(base64.b64decode(document["signature"]))
    signature[0] ^= 0x01
    document["signature"] = base64.b64encode(bytes(signature)).decode()
    with pytest.raises(VerificationError, match=r"step 2 .*signature over the body is invalid"):
        verify(Evidence("simulated", json.dumps(document).encode()), sim_policy(), expected_report_data=None, now=NOW)


def test_sim_signed_by_another_key_refused(key: Ed25519PrivateKey) -> None:
    # The body names `key` as signer, but an attacker's key signed it.
    attacker = Ed25519PrivateKey.generate()
    honest = json.loads(make_sim(key))
    body = base64.b64decode(honest["body"])
    honest["signature"] = base64.b64encode(attacker.sign(body)).decode()
    with pytest.raises(VerificationError, match="signature over the body is invalid"):
        verify(Evidence("simulated", json.dumps(honest).encode()), sim_policy(), expected_report_data=None, now=NOW)


def test_sim_altered_body_refused(key: Ed25519PrivateKey) -> None:
    document = json.loads(make_sim(key))
    claims = json.loads(base64.b64decode(document["body"]))
    claims["measurement"] = "ff" * 32
    document["body"] = base64.b64encode(sim_body_bytes(claims)).decode()
    with pytest.raises(VerificationError, match="signature over the body is invalid"):
        verify(Evidence("simulated", json.dumps(document).encode()), None, expected_report_data=None, now=NOW)


def test_sim_signers_pinned(key: Ed25519PrivateKey) -> None:
    raw = make_sim(key)
    accepted = verify(
        Evidence("simulated", raw), sim_policy(sim_signers=(public_hex(key),)), expected_report_data=None, now=NOW
    )
    assert accepted.tee == "simulated"
    stranger = public_hex(Ed25519PrivateKey.generate())
    with pytest.raises(PolicyRefusal, match="not in the policy's sim_signers"):
        verify(Evidence("simulated", raw), sim_policy(sim_signers=(stranger,)), expected_report_data=None, now=NOW)


def test_sim_debug_refused(key: Ed25519PrivateKey) -> None:
    with pytest.raises(PolicyRefusal, match=r"step 3c \(debug\)"):
        verify(Evidence("simulated", make_sim(key, debug=True)), sim_policy(), expected_report_data=None, now=NOW)


def test_sim_wrong_measurement_refused(key: Ed25519PrivateKey) -> None:
    with pytest.raises(PolicyRefusal, match=r"step 3e .*sim"):
        verify(
            Evidence("simulated", make_sim(key, measurement="ab" * 32)),
            sim_policy(),
            expected_report_data=None,
            now=NOW,
        )


def test_non_canonical_body_refused_even_if_signed(key: Ed25519PrivateKey) -> None:
    claims = json.loads(base64.b64decode(json.loads(make_sim(key))["body"]))
    body = json.dumps(claims, indent=1).encode()  # same claims, another spelling
    raw = sim_evidence_bytes(body, key.sign(body))
    with pytest.raises(VerificationError, match="canonical"):
        Evidence("simulated", raw)


@pytest.mark.parametrize(
    "overrides",
    [
        {"measurement": "AB" * 32},  # upper case is not canonical
        {"measurement": "ab" * 31},
        {"report_data": "00" * 63},
        {"debug": 0},
        {"issued_at": True},
        {"issued_at": "1750000000"},
        {"tee": "sgx"},
        {"extra": 1},
    ],
)
def test_malformed_claims_refused(key: Ed25519PrivateKey, overrides: dict[str, Any]) -> None:
    with pytest.raises(VerificationError, match="simulated evidence body"):
        Evidence("simulated", make_sim(key, **overrides))


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[]",
        b'{"format": "infenclave-sim-evidence/1", "body": "", "signature": ""}',
        b'{"format": "infenclave-sim-evidence/2", "body": "", "signature": ""}',
        b'{"format": "infenclave-sim-evidence/1", "format": "x", "body": "", "signature": ""}',
        b'{"format": "infenclave-sim-evidence/1", "body": "!!", "signature": "AA=="}',
        b"{" * 100_000,  # over the size limit
        b"[" * 10_000,  # deep nesting within it
    ],
)
def test_garbage_sim_evidence_refused(raw: bytes) -> None:
    with pytest.raises(VerificationError):
        Evidence("simulated", raw)


def test_sim_format_helpers_match_the_spec(key: Ed25519PrivateKey) -> None:
    raw = make_sim(key)
    parsed = parse_sim_evidence(raw)
    assert parsed.body == sim_body_bytes(dict(parsed.claims))
    assert parsed.body.startswith(b'{"debug":false,"issued_at":')
    again = sim_evidence_bytes(parsed.body, parsed.signature)
    assert parse_sim_evidence(again) == parsed


def test_expected_report_data_binds_key_model_and_nonce() -> None:
    key, nonce = b"k" * 32, b"x" * 16
    value = expected_report_data(key, nonce, MODEL_ID)
    tag = b"infenclave/report-data/v2\n"
    assert value == hashlib.sha256(tag + key + bytes.fromhex(MODEL_ID) + nonce).digest() + bytes(32)
    other_model = hashlib.sha256(b"the host's own bundle").hexdigest()
    assert expected_report_data(key, nonce, other_model) != value
    assert expected_report_data(b"j" * 32, nonce, MODEL_ID) != value
    for bad_nonce in (b"short", b"x" * 65):
        with pytest.raises(VerificationError, match="nonce"):
            expected_report_data(key, bad_nonce, MODEL_ID)
    with pytest.raises(VerificationError, match="public key"):
        expected_report_data(b"", nonce, MODEL_ID)
    with pytest.raises(VerificationError, match="model id"):
        expected_report_data(key, nonce, "AB" * 32)
