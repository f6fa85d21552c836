"""`infenclave attest` run as a real subprocess: verdicts, reasons and exit codes 0 / 1 / 2."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

import infenclave.attest
from infenclave.attest import sim_body_bytes

ROOT = Path(__file__).resolve().parents[1]
EVIDENCE = Path(__file__).resolve().parent / "data" / "evidence"
REL = Path(os.path.relpath(EVIDENCE, ROOT))  # tests/data/evidence, as a user types it
SGX_AT = "2025-06-19T11:56:11Z"
SGX_MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
SNP_MEASUREMENT = "b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b6bdf8a9ece31a5a608eb0cf2e4872b01"


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run the installed console script (fallback: the module) from the project root."""
    script = Path(sys.executable).parent / "infenclave"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "infenclave.cli"]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=ROOT)


def policy_file(tmp_path: Path, document: dict[str, Any]) -> Path:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(document))
    return path


def sgx_args(*extra: str | Path) -> list[str | Path]:
    return [
        "attest",
        REL / "sgx" / "sgx_quote",
        "--collateral",
        REL / "sgx" / "sgx_quote_collateral.json",
        *extra,
    ]


SGX_POLICY = {
    "tee_types": ["sgx"],
    "measurements": {"mrenclave": [SGX_MRENCLAVE]},
    "tcb_statuses": ["ConfigurationAndSWHardeningNeeded"],
}


def test_accepted_exit_0(tmp_path: Path) -> None:
    result = cli(*sgx_args("--at", SGX_AT, "--policy", policy_file(tmp_path, SGX_POLICY), "--json"))
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["verdict"] == "accepted" and document["reason"] is None
    assert document["verified_at"] == SGX_AT
    assert document["claims"]["tcb_status"] == "ConfigurationAndSWHardeningNeeded"
    assert document["claims"]["advisory_ids"] == ["INTEL-SA-00289", "INTEL-SA-00615"]
    assert document["claims"]["measurements"]["mrenclave"] == SGX_MRENCLAVE


def test_crypto_only_without_policy_exit_0() -> None:
    result = cli(*sgx_args("--at", SGX_AT, "--json"))
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["verdict"] == "verified-no-policy"
    assert document["claims"]["tee"] == "sgx"


def test_human_output_crypto_only() -> None:
    result = cli(*sgx_args("--at", SGX_AT))
    assert result.returncode == 0, result.stderr
    assert SGX_MRENCLAVE[:40] in result.stdout.replace("\n", "").replace("│", "").replace(" ", "")
    assert "not acceptance" in result.stdout.replace("\n", " ")


def test_expired_collateral_today_exit_3() -> None:
    result = cli(*sgx_args("--json"))
    assert result.returncode == 3  # ExitCode.REFUSED
    document = json.loads(result.stdout)
    assert document["verdict"] == "refused" and document["claims"] is None
    assert "expired" in document["reason"]


def test_tcb_status_refused_exit_3_with_reason(tmp_path: Path) -> None:
    strict = dict(SGX_POLICY, tcb_statuses=["UpToDate"])
    result = cli(*sgx_args("--at", SGX_AT, "--policy", policy_file(tmp_path, strict)))
    assert result.returncode == 3  # ExitCode.REFUSED
    text = " ".join(result.stdout.split())
    assert "REFUSED" in text
    assert "TCB status ConfigurationAndSWHardeningNeeded is not accepted by the policy (accepted: UpToDate" in text
    assert "tcb_status" in text  # the claims are shown beside the refusal


def test_debug_enclave_refused_exit_3(tmp_path: Path) -> None:
    policy = {
        "tee_types": ["sgx"],
        "measurements": {"mrenclave": ["4000659c8f1c3094f9eefa7fb9ccc5bdb21b6f2893cdb5081f179e737d0c7247"]},
    }
    result = cli(
        "attest",
        REL / "sgx" / "sgx_quote_debug_enclave.bin",
        "--at",
        SGX_AT,
        "--policy",
        policy_file(tmp_path, policy),
        "--json",
    )
    assert result.returncode == 3  # ExitCode.REFUSED
    document = json.loads(result.stdout)
    assert "step 3c (debug)" in document["reason"]
    assert document["claims"]["debug"] is True


def test_snp_accepted_with_debug_allowed(tmp_path: Path) -> None:
    policy = {
        "tee_types": ["sev-snp"],
        "measurements": {"snp_measurement": [SNP_MEASUREMENT], "snp_host_data": ["00" * 32]},
        "allow_debug": True,
        "snp_vmpls": [0],
    }
    result = cli(
        "attest",
        REL / "snp" / "attestation.bin",
        "--at",
        "2025-06-19T12:00:00Z",
        "--policy",
        policy_file(tmp_path, policy),
        "--json",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["claims"]["details"]["reported_tcb"] == "0200000000000544"


def test_simulated_evidence_file(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    signer = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    body = sim_body_bytes(
        {
            "tee": "simulated",
            "measurement": "ab" * 32,
            "report_data": "00" * 64,
            "debug": False,
            "issued_at": int(time.time()),
            "signer": signer,
        }
    )
    evidence = tmp_path / "sim.json"
    evidence.write_text(
        json.dumps(
            {
                "format": "infenclave-sim-evidence/1",
                "body": base64.b64encode(body).decode(),
                "signature": base64.b64encode(key.sign(body)).decode(),
            }
        )
    )
    allowing = {
        "tee_types": ["simulated"],
        "measurements": {"sim": ["ab" * 32]},
        "allow_simulation": True,
        "sim_signers": [signer],
    }
    result = cli("attest", evidence, "--policy", policy_file(tmp_path, allowing), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SIMULATED" in result.stderr  # the unsafe switch warns at run time
    refusing = {"tee_types": ["sgx"], "measurements": {"mrenclave": [SGX_MRENCLAVE]}}
    result = cli("attest", evidence, "--policy", policy_file(tmp_path, refusing), "--json")
    assert result.returncode == 3  # ExitCode.REFUSED
    assert "does not allow simulation" in json.loads(result.stdout)["reason"]


@pytest.mark.parametrize(
    ("args", "stderr"),
    [
        (["attest", "absent.bin"], "cannot read evidence file"),
        (["attest", REL / "sgx" / "TrustedRootCA.der"], "not recognised"),
        (sgx_args("--at", "yesterday"), "not an ISO-8601 time"),
    ],
)
def test_bad_input_exit_2(args: list[str | Path], stderr: str) -> None:
    result = cli(*args)
    assert result.returncode == 2
    assert stderr in result.stderr


def test_bad_policy_exit_2(tmp_path: Path) -> None:
    result = cli(*sgx_args("--at", SGX_AT, "--policy", policy_file(tmp_path, dict(SGX_POLICY, extra=1))))
    assert result.returncode == 2
    assert "unknown key(s) extra" in result.stderr
    empty = cli(*sgx_args("--at", SGX_AT, "--policy", policy_file(tmp_path, {})))
    assert empty.returncode == 2 and "empty policy" in empty.stderr


def test_public_surface() -> None:
    assert set(infenclave.attest.__all__) == {
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
    }
    for name in infenclave.attest.__all__:
        assert getattr(infenclave.attest, name) is not None
    with pytest.raises(AttributeError):
        infenclave.attest.not_a_name  # noqa: B018
