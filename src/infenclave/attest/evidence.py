"""Attestation evidence as it arrives: typed, immutable, structure checked, nothing verified.

`Evidence` is the envelope every backend produces and the client verifies:

- `tee`: "sgx", "tdx", "sev-snp" or "simulated";
- `raw`: the DCAP quote, the 1184-byte SNP report, or the simulated evidence document;
- `collateral`: for SGX/TDX, the dcap-qvl collateral JSON (PCS CRLs, TCB info, QE identity);
- `certificates`: for SEV-SNP, a PEM bundle of VCEK, ASK and ARK (leaf first).

Constructing an `Evidence` checks sizes and layout (a quote's header matches its tee type,
no trailing data, an SNP report's size and version, the simulated document's schema) and
refuses garbage with a `VerificationError`; signatures, chains and policy are checked only
by `infenclave.attest.verifier.verify`.

On the wire (what the host server returns) evidence travels in the envelope of
`infenclave.protocol.envelope`, one per enclave worker in the server's ``/v1/attestation``
answer (`AttestationAnswer`, read by the client SDK and by ``infenclave attest`` alike).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding

from infenclave.attest._quote import parse_quote, quote_tee
from infenclave.attest._sim import parse_sim_evidence
from infenclave.attest._snp import (
    SNP_REPORT_BYTES,
    looks_like_snp_report,
    parse_snp_certificates,
    parse_snp_report,
)
from infenclave.attest._x509 import load_der_certificate, load_pem_certificates
from infenclave.attest.policy import TEE_TYPES
from infenclave.errors import UsageError, VerificationError
from infenclave.protocol.envelope import (
    ENVELOPE_FORMAT,
    MAX_ENVELOPE_BYTES,
    decode_envelope,
    decode_envelope_object,
    encode_envelope,
)
from infenclave.protocol.files import read_bounded
from infenclave.protocol.sim_evidence import MAX_SIM_EVIDENCE_BYTES, SIM_EVIDENCE_FORMAT
from infenclave.protocol.strict_json import loads_object

__all__ = [
    "ENVELOPE_FORMAT",
    "MAX_ATTESTATION_ANSWER_BYTES",
    "MAX_CERTIFICATES_BYTES",
    "MAX_COLLATERAL_BYTES",
    "MAX_ENVELOPE_BYTES",
    "MAX_QUOTE_BYTES",
    "AttestationAnswer",
    "EnclaveEvidence",
    "Evidence",
    "load_evidence_file",
    "parse_attestation_answer",
    "parse_evidence_envelope",
    "read_attestation_answer",
]

#: A DCAP quote with its embedded PCK chain is about 5 KiB.
MAX_QUOTE_BYTES = 64 * 1024
#: dcap-qvl collateral (two CRLs, TCB info, QE identity, three issuer chains) is ~20-40 KiB.
MAX_COLLATERAL_BYTES = 1024 * 1024
#: VCEK + ASK + ARK in PEM is about 6 KiB.
MAX_CERTIFICATES_BYTES = 64 * 1024
#: A ``/v1/attestation`` answer: one envelope per worker; a sim or SNP envelope is a few KiB,
#: an SGX one with collateral ~60 KiB, and a server runs at most 64 workers.
MAX_ATTESTATION_ANSWER_BYTES = 16 * 1024 * 1024
# Where `load_evidence_file` looks for an SNP report's certificates, as the AMD KDS and
# go-sev-guest name them.
_VCEK_NAMES = ("vcek.der", "vcek.pem")
_ASK_ARK_NAMES = ("ask_ark_milan.pem", "cert_chain.pem")


@dataclass(frozen=True)
class Evidence:
    """Unverified attestation evidence whose structure has been checked (see module doc)."""

    tee: str
    raw: bytes
    collateral: bytes | None = None
    certificates: bytes | None = None

    def __post_init__(self) -> None:
        if self.tee not in TEE_TYPES:
            raise VerificationError(f"evidence: unknown TEE type {self.tee!r}")
        if not isinstance(self.raw, bytes):
            raise VerificationError("evidence: raw must be bytes")
        for name in ("collateral", "certificates"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bytes):
                raise VerificationError(f"evidence: {name} must be bytes or None")
        _check_limit("collateral", self.collateral, MAX_COLLATERAL_BYTES)
        _check_limit("certificates", self.certificates, MAX_CERTIFICATES_BYTES)
        if self.tee in ("sgx", "tdx"):
            _check_limit("quote", self.raw, MAX_QUOTE_BYTES)
            detected = quote_tee(self.raw)
            if detected != self.tee:
                raise VerificationError(
                    f"evidence: tagged {self.tee!r} but the quote header says "
                    f"{detected or 'it is not a supported DCAP quote'}"
                )
            parse_quote(self.raw)
            if self.certificates is not None:
                raise VerificationError(
                    f"evidence: {self.tee} evidence carries no certificates field "
                    "(the PCK chain travels inside the quote)"
                )
        elif self.tee == "sev-snp":
            parse_snp_report(self.raw)
            if self.collateral is not None:
                raise VerificationError(
                    "evidence: SEV-SNP evidence has no collateral; its VCEK chain goes in certificates"
                )
            if self.certificates is not None:
                parse_snp_certificates(self.certificates)
        else:
            parse_sim_evidence(self.raw)
            if self.collateral is not None or self.certificates is not None:
                raise VerificationError("evidence: simulated evidence has no collateral or certificates")

    def to_json(self) -> bytes:
        """Serialise to the JSON envelope (`infenclave-evidence/1`)."""
        return encode_envelope(self.tee, self.raw, self.collateral, self.certificates)

    @classmethod
    def from_json(cls, data: bytes) -> Evidence:
        """Parse a JSON envelope; the same as `parse_evidence_envelope`."""
        return parse_evidence_envelope(data)


def parse_evidence_envelope(data: bytes) -> Evidence:
    """Parse the JSON envelope a server returns into `Evidence` (structure checked)."""
    tee, raw, collateral, certificates = decode_envelope(data)
    return Evidence(tee=tee, raw=raw, collateral=collateral, certificates=certificates)


@dataclass(frozen=True)
class EnclaveEvidence:
    """One worker's entry in an attestation answer: its key and its (unverified) evidence."""

    public_key: bytes
    provisioned: bool
    evidence: Evidence

    @property
    def key_id(self) -> str:
        """How the server names this worker: the hex of its public key."""
        return self.public_key.hex()


@dataclass(frozen=True)
class AttestationAnswer:
    """A server's ``GET /v1/attestation`` answer, structure checked, nothing verified.

    ``{"model_id": HEX, "enclaves": [{"key_id": HEX, "public_key": HEX, "provisioned": bool,
    "evidence": ENVELOPE-AS-STRING}, ...]}`` (docs/protocol.md).
    """

    model_id: str
    enclaves: tuple[EnclaveEvidence, ...]


def parse_attestation_answer(document: dict[str, Any]) -> AttestationAnswer:
    """Check an attestation answer's structure and parse every worker's evidence envelope."""
    model_id = document.get("model_id")
    entries = document.get("enclaves")
    if not isinstance(model_id, str) or not isinstance(entries, list) or not entries:
        raise VerificationError("the server's attestation answer is malformed or lists no enclave")
    if len(model_id) != 64 or not all(c in "0123456789abcdef" for c in model_id):
        raise VerificationError("the server's attestation answer: model_id is not 64 hex digits")
    enclaves = []
    for index, entry in enumerate(entries):
        try:
            public_key = bytes.fromhex(entry["public_key"])
            if entry.get("key_id") != public_key.hex() or len(public_key) != 32:
                raise ValueError("key id")
            envelope = entry["evidence"]
            if not isinstance(envelope, str):
                raise TypeError("evidence")
            evidence = parse_evidence_envelope(envelope.encode("utf-8"))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise VerificationError(f"enclave {index}: malformed attestation entry") from exc
        enclaves.append(EnclaveEvidence(public_key, entry.get("provisioned") is True, evidence))
    return AttestationAnswer(model_id, tuple(enclaves))


def read_attestation_answer(path: Path) -> AttestationAnswer | None:
    """A saved ``/v1/attestation`` answer in *path*, or None when the file is something else."""
    data = _read(path, MAX_ATTESTATION_ANSWER_BYTES, "evidence")
    if data.lstrip()[:1] != b"{":
        return None
    document = loads_object(data, f"evidence file {path}", VerificationError)
    if "enclaves" not in document or "format" in document:
        return None
    return parse_attestation_answer(document)


def load_evidence_file(path: Path, collateral_path: Path | None = None) -> Evidence:
    """Load evidence from a file, recognising its kind by content.

    Recognised: our JSON envelope; a simulated evidence document; a raw SGX quote v3 or TDX
    quote v4/v5 (by header), with `collateral_path` naming its dcap-qvl collateral JSON
    (optional: without it only the quote's own chain can be checked, and no policy accepts
    it); a 1184-byte SEV-SNP report, whose certificates come from `collateral_path` (a PEM
    bundle VCEK, ASK, ARK) or else from `vcek.der`/`vcek.pem` and
    `ask_ark_milan.pem`/`cert_chain.pem` beside it.
    """
    data = _read(path, MAX_ENVELOPE_BYTES, "evidence")
    if data.lstrip()[:1] == b"{":
        document = loads_object(data, f"evidence file {path}", VerificationError)
        kind = document.get("format")
        if kind == SIM_EVIDENCE_FORMAT:
            if collateral_path is not None:
                raise UsageError("simulated evidence takes no collateral")
            if len(data) > MAX_SIM_EVIDENCE_BYTES:
                raise VerificationError("simulated evidence is over its size limit")
            return Evidence(tee="simulated", raw=data)
        if kind != ENVELOPE_FORMAT:
            raise VerificationError(
                f"evidence file {path}: JSON with format {kind!r} is neither "
                f"{ENVELOPE_FORMAT!r} nor {SIM_EVIDENCE_FORMAT!r}"
            )
        tee, raw, collateral, certificates = decode_envelope_object(document)
        evidence = Evidence(tee=tee, raw=raw, collateral=collateral, certificates=certificates)
        if collateral_path is None:
            return evidence
        return _with_extra_file(evidence, collateral_path)
    if looks_like_snp_report(data):
        if collateral_path is not None:
            certificates = _read(collateral_path, MAX_CERTIFICATES_BYTES, "SEV-SNP certificates")
        else:
            certificates = _discover_snp_certificates(path.parent)
        return Evidence(tee="sev-snp", raw=data, certificates=certificates)
    quoted = quote_tee(data)
    if quoted is None:
        raise VerificationError(
            f"evidence file {path}: not recognised (not an infenclave JSON envelope, a "
            f"simulated evidence document, an SGX v3 / TDX v4-v5 DCAP quote, or a "
            f"{SNP_REPORT_BYTES}-byte SEV-SNP report)"
        )
    if len(data) > MAX_QUOTE_BYTES:
        raise VerificationError(f"evidence file {path}: quote over the {MAX_QUOTE_BYTES} limit")
    collateral = None
    if collateral_path is not None:
        collateral = _read(collateral_path, MAX_COLLATERAL_BYTES, "collateral")
    return Evidence(tee=quoted, raw=data, collateral=collateral)


def _with_extra_file(evidence: Evidence, extra: Path) -> Evidence:
    """Fill an envelope's missing collateral (SGX/TDX) or certificates (SNP) from a file."""
    if evidence.tee in ("sgx", "tdx"):
        if evidence.collateral is not None:
            raise UsageError("the evidence envelope already carries collateral")
        collateral = _read(extra, MAX_COLLATERAL_BYTES, "collateral")
        return Evidence(evidence.tee, evidence.raw, collateral=collateral)
    if evidence.tee == "sev-snp":
        if evidence.certificates is not None:
            raise UsageError("the evidence envelope already carries certificates")
        certificates = _read(extra, MAX_CERTIFICATES_BYTES, "SEV-SNP certificates")
        return Evidence(evidence.tee, evidence.raw, certificates=certificates)
    raise UsageError("simulated evidence takes no collateral")


def _discover_snp_certificates(directory: Path) -> bytes | None:
    """Build the VCEK, ASK, ARK PEM bundle from the files beside a report, if present."""
    vcek_path = next((directory / n for n in _VCEK_NAMES if (directory / n).is_file()), None)
    chain_path = next((directory / n for n in _ASK_ARK_NAMES if (directory / n).is_file()), None)
    if vcek_path is None or chain_path is None:
        return None
    vcek_bytes = _read(vcek_path, MAX_CERTIFICATES_BYTES, "VCEK")
    if vcek_path.suffix == ".der":
        vcek_pem = load_der_certificate(vcek_bytes, f"VCEK {vcek_path}").public_bytes(Encoding.PEM)
    else:
        vcek_pem = vcek_bytes
    chain_pem = _read(chain_path, MAX_CERTIFICATES_BYTES, "ASK/ARK")
    chain = load_pem_certificates(chain_pem, str(chain_path))
    if len(chain) != 2:
        raise VerificationError(f"{chain_path}: expected the ASK and the ARK, found {len(chain)} certificates")
    return vcek_pem + b"".join(cert.public_bytes(Encoding.PEM) for cert in chain)


def _read(path: Path, limit: int, what: str) -> bytes:
    """Read at most `limit` bytes; a missing file is a usage error, a huge one is refused."""
    return read_bounded(path, limit, f"{what} file", UsageError, VerificationError)


def _check_limit(name: str, value: bytes | None, limit: int) -> None:
    if value is not None and len(value) > limit:
        raise VerificationError(f"evidence: {name} is {len(value)} bytes, over the {limit} limit")
