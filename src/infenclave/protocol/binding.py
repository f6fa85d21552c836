"""What an enclave's evidence binds: its key, the client's nonce and the model it serves.

Every TEE's evidence carries 64 bytes of report data chosen by the enclave. infenclave puts
there (version 2)::

    SHA-256( b"infenclave/report-data/v2\n" || enclave public key (32) || model id (32)
             || nonce (16..64) )  zero-padded to 64 bytes

- the key binds the evidence to the enclave that will open the client's ciphertext;
- the model id (SHA-256 of the bundle manifest the enclave loaded) binds *which model* it
  serves, so a host cannot show evidence of an honest enclave program running a bundle of
  its own making while the client believes it talks to the owner's model;
- the nonce makes it fresh.

Fixed-size fields come first and the one variable field last, so the encoding is
injective. The enclave computes it when it produces evidence, the verifier when it checks it,
with this one function.
"""

from __future__ import annotations

import hashlib
import re

from infenclave.errors import VerificationError

__all__ = ["MAX_NONCE_BYTES", "MIN_NONCE_BYTES", "REPORT_DATA_BYTES", "expected_report_data"]

#: Freshness comes from the nonce: fewer than 128 bits could be guessed or repeated.
MIN_NONCE_BYTES = 16
#: A nonce is random bytes, not a payload.
MAX_NONCE_BYTES = 64
#: The REPORTDATA field of SGX and TDX quotes and the SNP report is 64 bytes.
REPORT_DATA_BYTES = 64
_TAG = b"infenclave/report-data/v2\n"
_MODEL_ID = re.compile(r"[0-9a-f]{64}")


def expected_report_data(public_key: bytes, nonce: bytes, model_id: str) -> bytes:
    """Return the report data binding *public_key*, *model_id* and *nonce* (module docstring)."""
    if not isinstance(public_key, bytes) or len(public_key) != 32:
        raise VerificationError("report data binding: the public key must be 32 bytes")
    if not isinstance(nonce, bytes) or not MIN_NONCE_BYTES <= len(nonce) <= MAX_NONCE_BYTES:
        raise VerificationError(f"report data binding: the nonce must be {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} bytes")
    if not isinstance(model_id, str) or _MODEL_ID.fullmatch(model_id) is None:
        raise VerificationError("report data binding: a model id is 64 lower-case hex digits")
    digest = hashlib.sha256(_TAG + public_key + bytes.fromhex(model_id) + nonce).digest()
    return digest + b"\x00" * (REPORT_DATA_BYTES - len(digest))
