"""Policy files: strict loading, clear errors naming the key, and the JSON round trip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from infenclave.attest import Measurements, Policy, load_policy
from infenclave.errors import PolicyError, UsageError

MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
MRTD = "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7"


def write(tmp_path: Path, document: Any, name: str = "policy.json") -> Path:
    path = tmp_path / name
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return path


def minimal(**overrides: Any) -> dict[str, Any]:
    document: dict[str, Any] = {"tee_types": ["sgx"], "measurements": {"mrenclave": [MRENCLAVE]}}
    document.update(overrides)
    return document


def test_minimal_policy_defaults(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, minimal()))
    assert policy.tee_types == ("sgx",)
    assert policy.measurements.mrenclave == (MRENCLAVE,)
    assert policy.allow_debug is False
    assert policy.tcb_statuses == ("UpToDate",)
    assert policy.unsafe_allows_simulation is False
    assert policy.max_evidence_age_s == 300
    assert policy.sim_signers is None


def test_full_policy_round_trips_through_json(tmp_path: Path) -> None:
    policy = Policy(
        tee_types=("sgx", "tdx", "simulated"),
        measurements=Measurements(
            mrenclave=(MRENCLAVE.upper(),), mrtd=(MRTD,), sim=("ab" * 32,), **{f"rtmr{i}": (MRTD,) for i in range(4)}
        ),
        allow_debug=False,
        tcb_statuses=("UpToDate", "SWHardeningNeeded"),
        unsafe_allow_simulation=True,
        max_evidence_age_s=60,
        sim_signers=("CD" * 32,),
    )
    assert policy.measurements.mrenclave == (MRENCLAVE,)  # lower-cased
    assert policy.sim_signers == ("cd" * 32,)
    again = load_policy(write(tmp_path, policy.to_json()))
    assert again == policy
    assert json.loads(policy.to_json())["allow_simulation"] is True


def test_yaml_policy(tmp_path: Path) -> None:
    text = f"""
tee_types: [tdx]
measurements:
  mrtd:
    - "{MRTD.upper()}"
  rtmr0: ["{MRTD}"]
  rtmr1: ["{MRTD}"]
  rtmr2: ["{MRTD}"]
  rtmr3: ["{MRTD}"]
tcb_statuses: [UpToDate, SWHardeningNeeded]
"""
    policy = load_policy(write(tmp_path, text, "policy.yaml"))
    assert policy.measurements.mrtd == (MRTD,)
    assert policy.tcb_statuses == ("UpToDate", "SWHardeningNeeded")


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({}, "tee_types: missing"),
        (minimal(tee_types=[]), "tee_types: the policy accepts no TEE type"),
        (minimal(measurements={}), "measurements: the policy lists no measurement"),
        (minimal(measurements={"mrenclave": []}), "measurements: the policy lists no measurement"),
        (minimal(extra=1), "unknown key(s) extra"),
        (minimal(measurements={"mrenclave": [MRENCLAVE], "mr_enclave": [MRENCLAVE]}), "unknown kind(s) mr_enclave"),
        (minimal(measurements={"mrenclave": ["xyz"]}), "measurements.mrenclave: 'xyz' is not a hex string"),
        (minimal(measurements={"mrenclave": [MRENCLAVE[:-2]]}), "measurements.mrenclave: .* expected 32"),
        (minimal(measurements={"mrenclave": MRENCLAVE}), "measurements.mrenclave: expected a list"),
        (minimal(measurements={"mrenclave": [MRENCLAVE, MRENCLAVE]}), "listed twice"),
        (minimal(tee_types=["sgx", "tdx"]), "tee_types accepts 'tdx' but lists no mrtd"),
        (minimal(tee_types=["sgx", "sev"]), "tee_types: unknown TEE type 'sev'"),
        # A confidential VM is pinned by what covers the program, not only by its firmware.
        (
            minimal(tee_types=["sgx", "tdx"], measurements={"mrenclave": [MRENCLAVE], "mrtd": [MRTD]}),
            "accepts 'tdx', which must pin every one of mrtd, rtmr0, rtmr1, rtmr2, rtmr3 "
            "(missing: rtmr0, rtmr1, rtmr2, rtmr3)",
        ),
        (
            minimal(tee_types=["sev-snp"], measurements={"snp_measurement": [MRTD]}, snp_vmpls=[0]),
            "accepts 'sev-snp', which must pin every one of snp_measurement, snp_host_data (missing: snp_host_data)",
        ),
        (
            minimal(tee_types=["sev-snp"], measurements={"snp_measurement": [MRTD], "snp_host_data": [MRENCLAVE]}),
            "snp_vmpls: required exactly when",
        ),
        (minimal(snp_vmpls=[0]), "snp_vmpls: required exactly when"),
        (
            minimal(
                tee_types=["sev-snp"],
                measurements={"snp_measurement": [MRTD], "snp_host_data": [MRENCLAVE]},
                snp_vmpls=[4],
            ),
            "snp_vmpls: expected a non-empty list of VMPLs 0..3",
        ),
        (minimal(tee_types="sgx"), "tee_types: expected a list"),
        (minimal(measurements={"mrenclave": [MRENCLAVE], "mrtd": [MRTD]}), "measurements.mrtd: listed, but tee_types"),
        (minimal(allow_debug="no"), "allow_debug: expected true or false"),
        (minimal(allow_debug=0), "allow_debug: expected true or false"),
        (minimal(tcb_statuses=[]), "tcb_statuses: at least one"),
        (minimal(tcb_statuses=["Revoked"]), "tcb_statuses: 'Revoked' is not an acceptable"),
        (minimal(tcb_statuses=["uptodate"]), "tcb_statuses: 'uptodate'"),
        (minimal(allow_simulation=True), "allow_simulation: true, but tee_types does not list"),
        (minimal(max_evidence_age_s=0), "max_evidence_age_s: must be a positive"),
        (minimal(max_evidence_age_s=1.5), "max_evidence_age_s: expected an integer"),
        (minimal(sim_signers=["ab" * 32]), "sim_signers: listed, but tee_types"),
        ([], "expected a JSON object"),
    ],
)
def test_policy_errors_name_the_key(tmp_path: Path, document: Any, message: str) -> None:
    with pytest.raises(PolicyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_policy(write(tmp_path, document))


def test_sim_signers_must_be_keys(tmp_path: Path) -> None:
    document = {
        "tee_types": ["simulated"],
        "measurements": {"sim": ["ab" * 32]},
        "allow_simulation": True,
        "sim_signers": ["ab" * 31],
    }
    with pytest.raises(PolicyError, match="sim_signers: .* expected 32"):
        load_policy(write(tmp_path, document))
    document["sim_signers"] = []
    with pytest.raises(PolicyError, match="sim_signers: an empty list"):
        load_policy(write(tmp_path, document))


def test_duplicate_keys_refused(tmp_path: Path) -> None:
    text = '{"tee_types": ["sgx"], "tee_types": ["tdx"], "measurements": {}}'
    with pytest.raises(PolicyError, match="duplicate key 'tee_types'"):
        load_policy(write(tmp_path, text))
    yaml_text = "tee_types: [sgx]\ntee_types: [tdx]\nmeasurements: {}\n"
    with pytest.raises(PolicyError, match="duplicate key 'tee_types'"):
        load_policy(write(tmp_path, yaml_text, "policy.yml"))


def test_unparseable_files(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="not valid UTF-8 JSON"):
        load_policy(write(tmp_path, "{tee_types: "))
    with pytest.raises(PolicyError, match="not valid YAML"):
        load_policy(write(tmp_path, "a: [b\n", "policy.yaml"))
    with pytest.raises(PolicyError, match=r"policy file .*empty policy|expected a mapping"):
        load_policy(write(tmp_path, "", "policy.yaml"))
    # The safe loader constructs no Python objects: the tag is refused, nothing runs.
    with pytest.raises(PolicyError, match="could not determine a constructor"):
        load_policy(write(tmp_path, "!!python/object/apply:os.system ['true']\n", "policy.yaml"))


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read policy file"):
        load_policy(tmp_path / "absent.json")
