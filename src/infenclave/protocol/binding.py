"""What an enclave's evidence binds, and how fresh it must be.

Every TEE's evidence carries 64 bytes of report data chosen by the enclave. infenclave puts
``SHA-256(enclave public key || nonce)`` there, zero-padded: the key binds the evidence to the
enclave that will open the client's ciphertext, the client's nonce makes it fresh. The
enclave computes it when it produces evidence, the verifier when it checks it, with this one
function.
"""

from __future__ import annotations

import hashlib

from infenclave.errors import VerificationError

__all__ = ["MAX_NONCE_BYTES", "MIN_NONCE_BYTES", "REPORT_DATA_BYTES", "expected_report_data"]

#: Freshness comes from the nonce: fewer than 128 bits could be guessed or repeated.
MIN_NONCE_BYTES = 16
#: A nonce is random bytes, not a payload.
MAX_NONCE_BYTES = 64
#: The REPORTDATA field of SGX and TDX quotes and the SNP report is 64 bytes.
REPORT_DATA_BYTES = 64


def expected_report_data(public_key: bytes, nonce: bytes) -> bytes:
    """Return SHA-256(public_key || nonce) zero-padded to 64 bytes (see module docstring)."""
    if not isinstance(public_key, bytes) or not public_key:
        raise VerificationError("report data binding: the public key must be non-empty bytes")
    if not isinstance(nonce, bytes) or not MIN_NONCE_BYTES <= len(nonce) <= MAX_NONCE_BYTES:
        raise VerificationError(
            f"report data binding: the nonce must be {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} bytes"
        )
    digest = hashlib.sha256(public_key + nonce).digest()
    return digest + b"\x00" * (REPORT_DATA_BYTES - len(digest))
