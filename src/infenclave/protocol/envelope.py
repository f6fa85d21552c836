"""The evidence envelope: how the host serves one enclave's attestation evidence.

UTF-8 JSON, every key present::

    {"format": "infenclave-evidence/1", "tee": "sgx" | "tdx" | "sev-snp" | "simulated",
     "raw": "<base64>", "collateral": "<base64>" | null, "certificates": "<base64>" | null}

`raw` is the DCAP quote, the SNP report or the simulated evidence document; `collateral` the
dcap-qvl collateral JSON (SGX/TDX); `certificates` a PEM bundle VCEK, ASK, ARK (SEV-SNP).
The host writes it (`encode_envelope`), the verifier reads it (`decode_envelope`, structure
only; `infenclave.attest.evidence.Evidence` then checks each part's layout). The enclave
never handles it: it hands the host raw evidence in a frame.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from infenclave.errors import VerificationError
from infenclave.protocol.strict_json import loads_object

__all__ = ["ENVELOPE_FORMAT", "ENVELOPE_KEYS", "MAX_ENVELOPE_BYTES", "decode_envelope", "encode_envelope"]

ENVELOPE_FORMAT = "infenclave-evidence/1"
ENVELOPE_KEYS = frozenset({"format", "tee", "raw", "collateral", "certificates"})
#: The base64 envelope of the largest allowed parts (64 KiB quote, 1 MiB collateral), with room.
MAX_ENVELOPE_BYTES = 2 * 1024 * 1024


def encode_envelope(tee: str, raw: bytes, collateral: bytes | None = None, certificates: bytes | None = None) -> bytes:
    """Serialise evidence parts into the envelope (sorted keys, so its bytes are stable)."""
    document = {
        "format": ENVELOPE_FORMAT,
        "tee": tee,
        "raw": _b64(raw),
        "collateral": None if collateral is None else _b64(collateral),
        "certificates": None if certificates is None else _b64(certificates),
    }
    return json.dumps(document, sort_keys=True).encode("utf-8")


def decode_envelope(data: bytes) -> tuple[str, bytes, bytes | None, bytes | None]:
    """Split an envelope into (tee, raw, collateral, certificates); structure only."""
    if len(data) > MAX_ENVELOPE_BYTES:
        raise VerificationError(f"evidence envelope is {len(data)} bytes, over the {MAX_ENVELOPE_BYTES} limit")
    return decode_envelope_object(loads_object(data, "evidence envelope", VerificationError))


def decode_envelope_object(document: dict[str, Any]) -> tuple[str, bytes, bytes | None, bytes | None]:
    """`decode_envelope` for an already parsed JSON object."""
    if set(document) != ENVELOPE_KEYS:
        raise VerificationError(f"evidence envelope: expected keys {sorted(ENVELOPE_KEYS)}, got {sorted(document)}")
    if document["format"] != ENVELOPE_FORMAT:
        raise VerificationError(f"evidence envelope: format {document['format']!r} is not {ENVELOPE_FORMAT!r}")
    tee = document["tee"]
    if not isinstance(tee, str):
        raise VerificationError("evidence envelope: tee must be a string")
    raw = _unb64("raw", document["raw"])
    if raw is None:
        raise VerificationError("evidence envelope: raw is required")
    return tee, raw, _unb64("collateral", document["collateral"]), _unb64("certificates", document["certificates"])


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(key: str, value: Any) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise VerificationError(f"evidence envelope: {key} must be base64 or null")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError) as exc:
        raise VerificationError(f"evidence envelope: {key} is not valid base64") from exc
