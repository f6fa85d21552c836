"""Enclave-side evidence producers: attestation evidence that binds 64 bytes of report data.

Why here: the enclave proves which program it runs *and* which public key it holds. The
caller passes ``report_data = SHA-256(enclave_pubkey || nonce)`` zero-padded to 64 bytes
(`infenclave.protocol.binding.expected_report_data`); the producer returns raw evidence
bytes for the host to relay. Producers only produce: parsing and verification live with the
client's verifier, never in the enclave.

- `SimEvidenceProducer` (``sim`` backend): a JSON statement signed by a per-installation
  Ed25519 key. It is honest about what it is (``tee: "simulated"``): a policy accepts it only
  where simulation is explicitly allowed, and anybody who can read the key file can forge it.
- `GramineEvidenceProducer` (``gramine-sgx``): a DCAP quote from Gramine's
  ``/dev/attestation`` pseudo-files.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from infenclave.crypto import (
    ED25519_KEY_SIZE,
    ed25519_public_key,
    ed25519_sign,
    load_or_create_key_file,
)
from infenclave.errors import EnclaveError
from infenclave.protocol.binding import REPORT_DATA_BYTES
from infenclave.protocol.sim_evidence import (
    SIM_EVIDENCE_FORMAT,
    sim_body_bytes,
    sim_evidence_bytes,
)

__all__ = [
    "MAX_QUOTE_SIZE",
    "REPORT_DATA_BYTES",
    "SIM_EVIDENCE_FORMAT",
    "SIM_MEASUREMENT_SIZE",
    "SIM_SIGNING_KEY_FILE",
    "EvidenceProducer",
    "GramineEvidenceProducer",
    "SimEvidenceProducer",
]

#: The sim format carries a SHA-256 measurement (64 hex digits).
SIM_MEASUREMENT_SIZE = 32
SIM_SIGNING_KEY_FILE = "sim-evidence-ed25519.key"
#: A DCAP ECDSA quote with its PCK certificate chain is ~4-5 KiB; 64 KiB is generous.
MAX_QUOTE_SIZE = 64 * 1024

# SGX quote v3/v4 layout (Intel SGX ECDSA Quote Library Reference, "Quote Format"): a 48-byte
# header (version u16 LE at 0; at 4, reserved in v3 and TEE type in v4, zero for SGX), then
# the 384-byte ISV enclave report body, whose REPORTDATA is its last 64 bytes.
_QUOTE_HEADER_SIZE = 48
_REPORT_DATA_OFFSET = _QUOTE_HEADER_SIZE + 320


class EvidenceProducer(Protocol):
    """What the enclave program needs from a backend: a TEE name and evidence for report data."""

    tee: str

    def evidence(self, report_data: bytes) -> bytes:
        """Return raw evidence binding *report_data* (exactly 64 bytes)."""
        ...


def _check_report_data(report_data: bytes) -> bytes:
    if not isinstance(report_data, (bytes, bytearray)) or len(report_data) != REPORT_DATA_BYTES:
        raise EnclaveError(f"report data must be exactly {REPORT_DATA_BYTES} bytes")
    return bytes(report_data)


class SimEvidenceProducer:
    """Evidence of the ``sim`` backend, signed with a per-installation Ed25519 key.

    Raw evidence is UTF-8 JSON ``{"format", "body", "signature"}``; ``body`` is the base64 of
    ``sim_body_bytes(claims)`` and ``signature`` the base64 Ed25519 signature over exactly
    those bytes, so a verifier checks the signature before it parses any claim.
    *clock* is a seam for tests (``issued_at``).
    """

    tee = "simulated"

    def __init__(self, state_dir: Path, measurement: bytes, clock: Callable[[], float] = time.time) -> None:
        # Checked here, so that a misconfigured enclave fails at start-up, not per request.
        if not isinstance(measurement, bytes) or len(measurement) != SIM_MEASUREMENT_SIZE:
            raise EnclaveError(f"measurement must be {SIM_MEASUREMENT_SIZE} bytes")
        self._measurement = measurement
        self._clock = clock
        self._signing_key = load_or_create_key_file(Path(state_dir) / SIM_SIGNING_KEY_FILE, ED25519_KEY_SIZE)
        self._signer_public = ed25519_public_key(self._signing_key)

    @property
    def signer_public_hex(self) -> str:
        """Hex of the raw Ed25519 public key: what a sim-allowing policy pins as trusted signer."""
        return self._signer_public.hex()

    def evidence(self, report_data: bytes) -> bytes:
        """Return signed simulated evidence binding *report_data* and the measurement."""
        claims = {
            "tee": self.tee,
            "measurement": self._measurement.hex(),
            "report_data": _check_report_data(report_data).hex(),
            "debug": False,
            "issued_at": int(self._clock()),
            "signer": self._signer_public.hex(),
        }
        body = sim_body_bytes(claims)
        return sim_evidence_bytes(body, ed25519_sign(self._signing_key, body))


class GramineEvidenceProducer:
    """DCAP quotes from Gramine's ``/dev/attestation`` (write ``user_report_data``, read ``quote``).

    Exercised here only against a temporary directory laid out like ``/dev/attestation``,
    with a real SGX quote copied in as ``quote``: real Gramine and SGX hardware were not
    available, so the pseudo-files' behaviour is taken from Gramine's documentation.

    The write/read pair is process-global state, so it is serialised with a lock, and the
    REPORTDATA inside the returned quote is compared with what was written: a quote for
    somebody else's report data is refused here rather than by the client.
    """

    tee = "sgx"

    def __init__(self, attestation_dir: Path = Path("/dev/attestation")) -> None:
        self._dir = Path(attestation_dir)
        self._lock = threading.Lock()

    def _attestation_type(self) -> str:
        try:
            with open(self._dir / "attestation_type", "rb") as handle:
                return handle.read(64).decode("ascii", errors="replace").strip()
        except OSError as exc:
            raise EnclaveError("no /dev/attestation: not running under Gramine SGX") from exc

    def evidence(self, report_data: bytes) -> bytes:
        """Return the DCAP quote whose REPORTDATA is *report_data* (64 bytes)."""
        data = _check_report_data(report_data)
        kind = self._attestation_type()
        if kind != "dcap":
            raise EnclaveError(f"Gramine attestation type is {kind!r}, need 'dcap'")
        with self._lock:
            try:
                with open(self._dir / "user_report_data", "wb") as handle:
                    handle.write(data)
                with open(self._dir / "quote", "rb") as handle:
                    quote = handle.read(MAX_QUOTE_SIZE + 1)
            except OSError as exc:
                raise EnclaveError("Gramine could not produce a quote") from exc
        if not quote:
            raise EnclaveError("Gramine returned an empty quote")
        if len(quote) > MAX_QUOTE_SIZE:
            raise EnclaveError(f"quote larger than {MAX_QUOTE_SIZE} bytes")
        self._check_quote_binds(quote, data)
        return quote

    @staticmethod
    def _check_quote_binds(quote: bytes, data: bytes) -> None:
        # Structural sanity only; the signature chain is the client's verifier's job.
        if len(quote) < _REPORT_DATA_OFFSET + REPORT_DATA_BYTES:
            raise EnclaveError("quote too short to be an SGX quote")
        version = int.from_bytes(quote[0:2], "little")
        if version not in (3, 4) or quote[4:8] != b"\x00\x00\x00\x00":
            raise EnclaveError(f"not an SGX quote (version {version})")
        if quote[_REPORT_DATA_OFFSET : _REPORT_DATA_OFFSET + REPORT_DATA_BYTES] != data:
            raise EnclaveError("the quote does not carry the report data that was written")
