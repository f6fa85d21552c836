"""Enclave-side evidence producers.

`SimEvidenceProducer` is checked end to end against the shared wire format and an
independent Ed25519 verification. `GramineEvidenceProducer` is checked against a temporary
directory laid out like Gramine's ``/dev/attestation``, with a real SGX DCAP quote standing
in for the ``quote`` pseudo-file; real Gramine and SGX were not available.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import sys
from datetime import UTC
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from infenclave.attest._sim import parse_sim_evidence
from infenclave.crypto import generate_keypair
from infenclave.enclave.evidence import (
    MAX_QUOTE_SIZE,
    SIM_SIGNING_KEY_FILE,
    GramineEvidenceProducer,
    SimEvidenceProducer,
)
from infenclave.errors import EnclaveError
from infenclave.protocol.binding import expected_report_data

MEASUREMENT = bytes(range(32))
ROOT = Path(__file__).resolve().parents[1]
SGX_QUOTE = Path(__file__).resolve().parent / "data" / "evidence" / "sgx" / "sgx_quote"
_REPORT_DATA = slice(368, 432)  # REPORTDATA inside an SGX quote v3


def _report_data() -> bytes:
    _, public = generate_keypair()
    return expected_report_data(public, os.urandom(32), "ab" * 32)


# --- simulated ------------------------------------------------------------------------------


def test_sim_evidence_format_and_signature(tmp_path: Path) -> None:
    producer = SimEvidenceProducer(tmp_path, MEASUREMENT, clock=lambda: 1_750_000_000.7)
    report_data = _report_data()
    raw = producer.evidence(report_data)
    assert producer.tee == "simulated"

    document = json.loads(raw.decode("utf-8"))
    assert set(document) == {"format", "body", "signature"}
    assert document["format"] == "infenclave-sim-evidence/1"
    body = base64.b64decode(document["body"])
    signature = base64.b64decode(document["signature"])
    # Independent check with pyca directly, not through infenclave.crypto.
    public = bytes.fromhex(producer.signer_public_hex)
    ed25519.Ed25519PublicKey.from_public_bytes(public).verify(signature, body)

    claims = json.loads(body)
    assert claims == {
        "tee": "simulated",
        "measurement": MEASUREMENT.hex(),
        "report_data": report_data.hex(),
        "debug": False,
        "issued_at": 1_750_000_000,
        "signer": producer.signer_public_hex,
    }
    # The shared parser (what the client's verifier uses) accepts it as canonical.
    parsed = parse_sim_evidence(raw)
    assert parsed.body == body and parsed.signature == signature


def test_sim_evidence_accepted_by_the_client_verifier(tmp_path: Path) -> None:
    """Producer and verifier agree: the client's verifier accepts it under a sim policy."""
    from datetime import datetime

    from infenclave.attest import load_evidence_file, load_policy, verify

    producer = SimEvidenceProducer(tmp_path, MEASUREMENT)
    report_data = _report_data()
    (tmp_path / "evidence.json").write_bytes(producer.evidence(report_data))
    policy = {
        "tee_types": ["simulated"],
        "measurements": {"sim": [MEASUREMENT.hex()]},
        "allow_simulation": True,
        "sim_signers": [producer.signer_public_hex],
    }
    (tmp_path / "policy.json").write_text(json.dumps(policy))
    claims = verify(
        load_evidence_file(tmp_path / "evidence.json"),
        load_policy(tmp_path / "policy.json"),
        expected_report_data=report_data,
        now=datetime.now(UTC),
    )
    assert claims.tee == "simulated"
    assert claims.report_data == report_data


def test_sim_signing_key_persistent_and_private(tmp_path: Path) -> None:
    first = SimEvidenceProducer(tmp_path, MEASUREMENT)
    key_file = tmp_path / SIM_SIGNING_KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert SimEvidenceProducer(tmp_path, MEASUREMENT).signer_public_hex == first.signer_public_hex
    assert SimEvidenceProducer(tmp_path / "other", MEASUREMENT).signer_public_hex != (first.signer_public_hex)


def test_sim_refuses_bad_inputs(tmp_path: Path) -> None:
    producer = SimEvidenceProducer(tmp_path, MEASUREMENT)
    for bad in (b"", b"x" * 32, b"x" * 63, b"x" * 65):
        with pytest.raises(EnclaveError):
            producer.evidence(bad)
    for measurement in (b"", b"m" * 31, b"m" * 48):
        with pytest.raises(EnclaveError):
            SimEvidenceProducer(tmp_path, measurement)


# --- Gramine ----------------------------------------------------------------------------------


def _attestation_dir(tmp_path: Path, kind: str = "dcap", quote: bytes | None = None) -> Path:
    root = tmp_path / "attestation"
    root.mkdir(parents=True)
    (root / "attestation_type").write_text(kind + "\n")
    if quote is None:
        shutil.copyfile(SGX_QUOTE, root / "quote")
    else:
        (root / "quote").write_bytes(quote)
    return root


def test_gramine_returns_quote_unchanged_and_writes_report_data(tmp_path: Path) -> None:
    real_quote = SGX_QUOTE.read_bytes()
    root = _attestation_dir(tmp_path)
    report_data = real_quote[_REPORT_DATA]  # the fake quote is for exactly this report data
    producer = GramineEvidenceProducer(root)
    assert producer.tee == "sgx"
    assert producer.evidence(report_data) == real_quote
    assert (root / "user_report_data").read_bytes() == report_data


def test_gramine_refuses_quote_for_other_report_data(tmp_path: Path) -> None:
    root = _attestation_dir(tmp_path)
    with pytest.raises(EnclaveError, match="does not carry the report data"):
        GramineEvidenceProducer(root).evidence(_report_data())
    # It was still written: the refusal is about what came back.
    assert len((root / "user_report_data").read_bytes()) == 64


@pytest.mark.parametrize("kind", ["none", "epid", ""])
def test_gramine_requires_dcap(tmp_path: Path, kind: str) -> None:
    root = _attestation_dir(tmp_path, kind=kind)
    with pytest.raises(EnclaveError, match="dcap"):
        GramineEvidenceProducer(root).evidence(b"\x00" * 64)
    assert not (root / "user_report_data").exists()


def test_gramine_outside_gramine(tmp_path: Path) -> None:
    with pytest.raises(EnclaveError) as info:
        GramineEvidenceProducer(tmp_path / "missing").evidence(b"\x00" * 64)
    assert isinstance(info.value.__cause__, OSError)


def test_gramine_refuses_empty_oversized_and_malformed_quotes(tmp_path: Path) -> None:
    real_quote = SGX_QUOTE.read_bytes()
    report_data = real_quote[_REPORT_DATA]
    cases = {
        "empty": (b"", "empty"),
        "big": (real_quote + b"\x00" * MAX_QUOTE_SIZE, "larger"),
        "short": (real_quote[:400], "too short"),
        "tdx": (b"\x04\x00\x02\x00\x81\x00\x00\x00" + real_quote[8:], "not an SGX quote"),
    }
    for name, (quote, message) in cases.items():
        root = _attestation_dir(tmp_path / name, quote=quote)
        with pytest.raises(EnclaveError, match=message):
            GramineEvidenceProducer(root).evidence(report_data)


def test_gramine_report_data_size_checked(tmp_path: Path) -> None:
    producer = GramineEvidenceProducer(_attestation_dir(tmp_path))
    for bad in (b"", b"\x00" * 32, b"\x00" * 65):
        with pytest.raises(EnclaveError):
            producer.evidence(bad)


# --- trusted computing base -----------------------------------------------------------------


def test_enclave_modules_import_only_the_allowed_set() -> None:
    """The TCB rule, checked: importing the enclave modules pulls in nothing from the host side."""
    script = (
        "import sys, json\n"
        "import infenclave.enclave.sandbox, infenclave.enclave.sealing, infenclave.enclave.evidence\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60).stdout
    modules = set(json.loads(out))
    ours = {m for m in modules if m == "infenclave" or m.startswith("infenclave.")}
    assert ours <= {
        "infenclave",
        "infenclave.errors",
        "infenclave.crypto",
        "infenclave.protocol",
        "infenclave.protocol.binding",
        "infenclave.protocol.sim_evidence",
        "infenclave.enclave",
        "infenclave.enclave.sandbox",
        "infenclave.enclave.sealing",
        "infenclave.enclave.evidence",
    }, sorted(ours)
    for forbidden in ("torch", "dcap_qvl", "fastapi", "uvicorn", "httpx", "typer", "jinja2"):
        assert forbidden not in modules, forbidden
