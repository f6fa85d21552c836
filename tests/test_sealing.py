"""Enclave sealing: the sim sealer's binding to the measurement, and the Gramine key file.

`GramineSealer` is tested against a temporary directory laid out like Gramine's
``/dev/attestation``; no SGX machine was available to read the real pseudo-file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from infenclave.enclave.sealing import SIM_SECRET_FILE, GramineSealer, SimSealer
from infenclave.errors import CryptoError, EnclaveError

MEASUREMENT = bytes.fromhex("11" * 32)
OTHER_MEASUREMENT = bytes.fromhex("11" * 31 + "12")


def test_sim_round_trip_survives_restart(tmp_path: Path) -> None:
    blob = SimSealer(tmp_path, MEASUREMENT).seal(b"model key", "model:lite0")
    # A new instance (the enclave restarted) with the same measurement unseals.
    assert SimSealer(tmp_path, MEASUREMENT).unseal(blob, "model:lite0") == b"model key"
    assert SimSealer(tmp_path, MEASUREMENT).unseal(blob, b"model:lite0") == b"model key"


def test_sim_other_measurement_cannot_unseal(tmp_path: Path) -> None:
    blob = SimSealer(tmp_path, MEASUREMENT).seal(b"model key", "model:lite0")
    with pytest.raises(CryptoError):
        SimSealer(tmp_path, OTHER_MEASUREMENT).unseal(blob, "model:lite0")


def test_sim_other_installation_cannot_unseal(tmp_path: Path) -> None:
    blob = SimSealer(tmp_path / "a", MEASUREMENT).seal(b"model key", "model:lite0")
    with pytest.raises(CryptoError):
        SimSealer(tmp_path / "b", MEASUREMENT).unseal(blob, "model:lite0")


def test_sim_label_and_tampering_refused(tmp_path: Path) -> None:
    sealer = SimSealer(tmp_path, MEASUREMENT)
    blob = sealer.seal(b"model key", "model:lite0")
    with pytest.raises(CryptoError):
        sealer.unseal(blob, "model:lite1")
    with pytest.raises(CryptoError):
        sealer.unseal(blob[:-1] + bytes([blob[-1] ^ 1]), "model:lite0")
    with pytest.raises(CryptoError):
        sealer.seal(b"x", "")


def test_sim_secret_file_mode_0600_created_once(tmp_path: Path) -> None:
    SimSealer(tmp_path, MEASUREMENT)
    secret = tmp_path / SIM_SECRET_FILE
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert secret.stat().st_size == 32
    before = secret.read_bytes()
    SimSealer(tmp_path, OTHER_MEASUREMENT)
    assert secret.read_bytes() == before


def test_sim_refuses_readable_secret_and_bad_measurement(tmp_path: Path) -> None:
    SimSealer(tmp_path, MEASUREMENT)
    (tmp_path / SIM_SECRET_FILE).chmod(0o644)
    with pytest.raises(CryptoError):
        SimSealer(tmp_path, MEASUREMENT)
    with pytest.raises(EnclaveError):
        SimSealer(tmp_path, b"")
    with pytest.raises(EnclaveError):
        SimSealer(tmp_path, b"m" * 65)


def _fake_attestation_dir(root: Path, key: bytes) -> Path:
    keys = root / "attestation" / "keys"
    keys.mkdir(parents=True)
    (keys / "_sgx_mrenclave").write_bytes(key)
    return root / "attestation"


def test_gramine_round_trip_and_key_binding(tmp_path: Path) -> None:
    key = os.urandom(16)
    sealer = GramineSealer(_fake_attestation_dir(tmp_path / "one", key))
    blob = sealer.seal(b"model key", "model:lite0")
    # The same MRENCLAVE key (same enclave, same CPU) unseals after a restart ...
    again = GramineSealer(_fake_attestation_dir(tmp_path / "two", key))
    assert again.unseal(blob, "model:lite0") == b"model key"
    # ... another one (another enclave build) does not.
    other = GramineSealer(_fake_attestation_dir(tmp_path / "three", os.urandom(16)))
    with pytest.raises(CryptoError):
        other.unseal(blob, "model:lite0")


def test_gramine_and_sim_blobs_do_not_mix(tmp_path: Path) -> None:
    gramine = GramineSealer(_fake_attestation_dir(tmp_path, os.urandom(16)))
    sim = SimSealer(tmp_path / "state", MEASUREMENT)
    with pytest.raises(CryptoError):
        gramine.unseal(sim.seal(b"k", "l"), "l")


@pytest.mark.parametrize("size", [0, 15, 17, 32])
def test_gramine_key_must_be_16_bytes(tmp_path: Path, size: int) -> None:
    with pytest.raises(EnclaveError):
        GramineSealer(_fake_attestation_dir(tmp_path, b"k" * size))


def test_gramine_missing_key_is_enclave_error(tmp_path: Path) -> None:
    with pytest.raises(EnclaveError) as info:
        GramineSealer(tmp_path / "no-such-dir")
    assert isinstance(info.value.__cause__, OSError)
