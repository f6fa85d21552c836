"""Sealing: state the enclave encrypts for itself, to survive its own restarts.

Why: once an attested enclave has received a model key, it should not need the model owner
again after a restart. It seals the key to *its own identity* and stores the blob on the
untrusted host's disk; only an enclave with the same identity can unseal it.

- `GramineSealer` (SGX): Gramine exposes the MRENCLAVE-bound sealing key of the running
  enclave as ``/dev/attestation/keys/_sgx_mrenclave`` (16 bytes, from EGETKEY). Another
  enclave build (another MRENCLAVE) or another CPU gets another key.
- `SimSealer` (``sim`` backend): a per-installation random secret (a 0600 file in the state
  directory) combined with the enclave program's measurement. A different measurement cannot
  unseal. This models the *binding* only: anybody who can read the secret file (root, the
  file's owner) can unseal, which is exactly what the ``sim`` backend does not protect against.

Both derive an AES-256-GCM key with HKDF-SHA256 and bind every blob to a *label* (what the
blob is, e.g. the model id) and to the identity, through the associated data. Refusals are
`CryptoError` (the blob does not open) or `EnclaveError` (no usable sealing key).
"""

from __future__ import annotations

from pathlib import Path

from infenclave.crypto import (
    AEAD_KEY_SIZE,
    aead_decrypt,
    aead_encrypt,
    context,
    derive_key,
    load_or_create_key_file,
)
from infenclave.errors import CryptoError, EnclaveError

__all__ = ["GRAMINE_KEY_SIZE", "MAX_MEASUREMENT_SIZE", "SIM_SECRET_FILE", "GramineSealer", "SimSealer"]

_KDF_SALT = b"infenclave/seal-kdf/v1"
_KEY_TAG = b"infenclave/seal-key/v1"
_AAD_TAG = b"infenclave/sealed/v1"

SIM_SECRET_FILE = "sim-seal.key"
#: MRENCLAVE and a SHA-256/384 measurement are 32 or 48 bytes.
MAX_MEASUREMENT_SIZE = 64
#: EGETKEY returns a 128-bit key; Gramine exposes it raw.
GRAMINE_KEY_SIZE = 16


class _Sealer:
    """AES-256-GCM under a derived key; blobs bound to (label, identity) through the AAD."""

    tee: str

    def __init__(self, key: bytes, identity: bytes) -> None:
        self._key = key
        self._identity = identity

    def _aad(self, label: bytes | str) -> bytes:
        if not label:
            raise CryptoError("a sealing label is required: it says what the blob is")
        return context(_AAD_TAG, self.tee, label, self._identity)

    def seal(self, data: bytes, label: bytes | str) -> bytes:
        """Encrypt *data* so that only this enclave identity can `unseal` it under *label*."""
        return aead_encrypt(self._key, data, self._aad(label))

    def unseal(self, blob: bytes, label: bytes | str) -> bytes:
        """Decrypt a `seal` blob; `CryptoError` if identity, label or any byte differs."""
        return aead_decrypt(self._key, blob, self._aad(label))


class SimSealer(_Sealer):
    """Sealing for the ``sim`` backend: installation secret + program measurement.

    The secret file is created once (mode 0600) in *state_dir*; the sealing key is
    HKDF-SHA256(secret, info = context(tag, "simulated", measurement)).
    """

    tee = "simulated"

    def __init__(self, state_dir: Path, measurement: bytes) -> None:
        if not isinstance(measurement, bytes) or not 0 < len(measurement) <= MAX_MEASUREMENT_SIZE:
            raise EnclaveError(f"measurement must be 1..{MAX_MEASUREMENT_SIZE} bytes")
        secret = load_or_create_key_file(Path(state_dir) / SIM_SECRET_FILE, AEAD_KEY_SIZE)
        key = derive_key(secret, salt=_KDF_SALT, info=context(_KEY_TAG, self.tee, measurement))
        super().__init__(key, measurement)


class GramineSealer(_Sealer):
    """Sealing under Gramine on SGX, with the MRENCLAVE-bound key Gramine exposes.

    Tested here only against a directory laid out like ``/dev/attestation``: no SGX machine
    and no Gramine were available, so the real pseudo-file was never read.
    """

    tee = "sgx"

    def __init__(self, attestation_dir: Path = Path("/dev/attestation")) -> None:
        key_path = Path(attestation_dir) / "keys" / "_sgx_mrenclave"
        try:
            with open(key_path, "rb") as handle:
                raw = handle.read(GRAMINE_KEY_SIZE + 1)
        except OSError as exc:
            raise EnclaveError(f"no SGX sealing key at {key_path} (not running under Gramine?)") from exc
        if len(raw) != GRAMINE_KEY_SIZE:
            raise EnclaveError(f"SGX sealing key at {key_path} is not {GRAMINE_KEY_SIZE} bytes")
        key = derive_key(raw, salt=_KDF_SALT, info=context(_KEY_TAG, self.tee, b"_sgx_mrenclave"))
        # The MRENCLAVE itself is already inside the key; the AAD names the key policy.
        super().__init__(key, b"_sgx_mrenclave")
