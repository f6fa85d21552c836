"""Confidential-VM evidence through Linux configfs-tsm (``--tee tdx`` / ``--tee sev-snp``).

Why here: in a TDX or SEV-SNP confidential VM the enclave program is an ordinary process of
the guest, and the guest kernel hands out the hardware's evidence through one interface for
both (Documentation/ABI/testing/configfs-tsm, Linux >= 6.7)::

    /sys/kernel/config/tsm/report/<entry>/   made by mkdir, removed by rmdir
        inblob      write: up to 64 bytes of report data
        privlevel   write: the VMPL the report is requested for (SNP; optional)
        outblob     read: the TDX quote / the SNP attestation report
        auxblob     read: SNP only, the certificate table (VCEK, ASK, ARK) when the host
                    provides one; empty otherwise
        provider    read: ``tdx_guest`` or ``sev_guest``
        generation  read: counts writes to inblob and the options, so that a caller can
                    tell whether somebody else wrote the entry between its write and its read

Steps of `ConfigfsTsmEvidenceProducer.evidence` (one request at a time, under a lock):

T1. mkdir a fresh entry (random name) under the root.
T2. ``provider`` is the one of this ``--tee``; ``generation`` read: g0.
T3. write ``privlevel`` (SNP, when configured), then ``inblob`` (exactly the 64 bytes).
T4. read ``outblob`` and ``auxblob``; read ``generation`` again: it must be g0 plus the
    writes of T3, else another writer raced us and the blob may be for its data: refused.
T5. the blob carries, at its REPORTDATA offset, exactly the bytes written (structural check
    only: signatures and chains are the client's verifier's job, never the enclave's).
T6. rmdir the entry, whatever happened.

Exercised here only against a directory laid out like configfs-tsm whose attributes a test
thread serves like the kernel does (tests/test_cvm_evidence.py), returning the real TDX
quote and SNP report of tests/data/evidence: no CVM was available. The entry's directory
operations are a seam (*mkdir*, *rmdir*), because a plain directory cannot create the attribute files
on mkdir (nor drop them on rmdir) the way configfs does; attribute reads and writes are real file I/O.

There is no sealing key in configfs-tsm: `NoSealer` seals nothing, so that a CVM worker gets
its model key from the owner or the key-release service at every start.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from infenclave.errors import CryptoError, EnclaveError
from infenclave.protocol.binding import REPORT_DATA_BYTES

__all__ = ["DEFAULT_TSM_ROOT", "PROVIDERS", "ConfigfsTsmEvidenceProducer", "NoSealer"]

DEFAULT_TSM_ROOT = Path("/sys/kernel/config/tsm/report")
#: ``--tee`` -> (configfs-tsm provider, evidence tee type, REPORTDATA offset in the blob).
#: TDX: quote v4/v5 header (48 bytes) + TD report body offset 520 (Intel TDX DCAP quoting
#: library API). SNP: ATTESTATION_REPORT offset 0x50 (AMD pub. 56860).
PROVIDERS: dict[str, tuple[str, str, int]] = {
    "tdx": ("tdx_guest", "tdx", 48 + 520),
    "sev-snp": ("sev_guest", "sev-snp", 0x50),
}
#: A TDX quote with its certification data is ~5 KiB, an SNP report 1184 bytes, an SNP
#: certificate table ~4-6 KiB: 64 KiB bounds every read.
MAX_BLOB_BYTES = 64 * 1024


class ConfigfsTsmEvidenceProducer:
    """TDX quotes / SNP reports binding 64 bytes of report data, via configfs-tsm (above)."""

    def __init__(
        self,
        tee: str,
        root: Path = DEFAULT_TSM_ROOT,
        *,
        privlevel: int | None = None,
        mkdir: Callable[[Path], None] = os.mkdir,
        rmdir: Callable[[Path], None] = os.rmdir,
    ) -> None:
        if tee not in PROVIDERS:
            raise EnclaveError(f"configfs-tsm: no provider for --tee {tee}")
        if privlevel is not None and (tee != "sev-snp" or not 0 <= privlevel <= 3):
            raise EnclaveError("configfs-tsm: privlevel is an SNP VMPL, 0..3")
        self._provider, self.tee, self._offset = PROVIDERS[tee]
        self._root = Path(root)
        self._privlevel = privlevel
        self._mkdir, self._rmdir = mkdir, rmdir
        self._lock = threading.Lock()

    def evidence(self, report_data: bytes) -> bytes:
        """The outblob binding *report_data* (see `evidence_parts`)."""
        return self.evidence_parts(report_data)[0]

    def evidence_parts(self, report_data: bytes) -> tuple[bytes, bytes]:
        """Return (outblob, auxblob) for exactly 64 bytes of *report_data* (steps T1-T6)."""
        if not isinstance(report_data, bytes) or len(report_data) != REPORT_DATA_BYTES:
            raise EnclaveError(f"report data must be exactly {REPORT_DATA_BYTES} bytes")
        with self._lock:
            entry = self._root / f"infenclave-{os.urandom(8).hex()}"
            try:
                self._mkdir(entry)  # T1
            except OSError as exc:
                raise EnclaveError("configfs-tsm: cannot create a report entry (not in a CVM?)") from exc
            try:
                return self._produce(entry, report_data)
            except OSError as exc:
                raise EnclaveError("configfs-tsm: the report could not be produced") from exc
            finally:
                try:
                    self._rmdir(entry)  # T6
                except OSError:
                    pass

    def _produce(self, entry: Path, report_data: bytes) -> tuple[bytes, bytes]:
        provider = _read(entry / "provider").decode("ascii", "replace").strip()  # T2
        if provider != self._provider:
            raise EnclaveError(f"configfs-tsm: provider is {provider!r}, --tee {self.tee} needs {self._provider!r}")
        before = _generation(entry)
        writes = 1
        if self._privlevel is not None:  # T3
            _write(entry / "privlevel", str(self._privlevel).encode("ascii"))
            writes += 1
        _write(entry / "inblob", report_data)
        blob = _read(entry / "outblob")  # T4
        aux = _read(entry / "auxblob") if (entry / "auxblob").exists() else b""
        if _generation(entry) != before + writes:
            raise EnclaveError("configfs-tsm: generation changed under us (a racing writer): refused")
        end = self._offset + REPORT_DATA_BYTES  # T5
        if len(blob) < end or blob[self._offset : end] != report_data:
            raise EnclaveError("configfs-tsm: the report does not carry the report data that was written")
        return blob, aux


class NoSealer:
    """configfs-tsm offers no sealing key: nothing is sealed, nothing unseals (the key-release
    service provides the model key at each start)."""

    def __init__(self, tee: str) -> None:
        self.tee = tee

    def seal(self, data: bytes, label: bytes | str) -> bytes:
        """An empty blob: the host stores nothing."""
        return b""

    def unseal(self, blob: bytes, label: bytes | str) -> bytes:
        """Always refused, so that the host asks for provisioning instead."""
        raise CryptoError("no sealing key in a confidential VM")


def _read(path: Path) -> bytes:
    with open(path, "rb") as handle:
        data = handle.read(MAX_BLOB_BYTES + 1)
    if len(data) > MAX_BLOB_BYTES:
        raise EnclaveError(f"configfs-tsm: {path.name} is over {MAX_BLOB_BYTES} bytes")
    return data


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb", buffering=0) as handle:
        handle.write(data)


def _generation(entry: Path) -> int:
    try:
        return int(_read(entry / "generation").decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as exc:
        raise EnclaveError("configfs-tsm: generation is not a number") from exc
