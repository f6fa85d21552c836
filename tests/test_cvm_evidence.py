"""Confidential-VM evidence through configfs-tsm (`infenclave.enclave.tsm`).

No TDX or SEV-SNP guest is available here, so the kernel side is a directory laid out like
``/sys/kernel/config/tsm/report`` that a thread serves the way the kernel does: mkdir makes
the attribute files; ``inblob`` and ``outblob`` are FIFOs, so the producer's write and read
are real file I/O that block until the "kernel" answers; a write to ``inblob`` (and to
``privlevel``) bumps ``generation``; ``outblob`` returns the REAL TDX quote or SNP report of
tests/data/evidence, ``auxblob`` the SNP certificate table built from the real VCEK/ASK/ARK.
The binding check stays on: the real evidence is accepted when the report data written is
its own (read from it) and refused with ours, in the enclave and by the client's verifier.
"""

from __future__ import annotations

import os
import shutil
import struct
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from infenclave.attest import Evidence, Measurements, Policy, PolicyRefusal, verify
from infenclave.attest._snp import SNP_CERT_GUIDS
from infenclave.crypto import generate_keypair
from infenclave.enclave.tsm import ConfigfsTsmEvidenceProducer, NoSealer
from infenclave.errors import CryptoError, EnclaveError, PolicyError
from infenclave.host.enclave_pool import split_evidence
from infenclave.protocol.binding import expected_report_data
from infenclave.protocol.envelope import encode_envelope
from infenclave.protocol.frames import Frame, MsgType

EVIDENCE = Path(__file__).resolve().parent / "data" / "evidence"
TDX_QUOTE = (EVIDENCE / "tdx" / "tdx_quote").read_bytes()
TDX_COLLATERAL = (EVIDENCE / "tdx" / "tdx_quote_collateral.json").read_bytes()
TDX_AT = datetime(2025, 6, 19, 11, 16, 3, tzinfo=UTC)
SNP_REPORT = (EVIDENCE / "snp" / "attestation.bin").read_bytes()
SNP_AT = datetime(2025, 6, 19, 12, 0, 0, tzinfo=UTC)
TDX_RD = slice(568, 632)  # REPORTDATA in a TDX quote v4 (48-byte header + 520)
SNP_RD = slice(0x50, 0x90)
TDX_MEASUREMENTS = {
    "mrtd": "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7",
    "rtmr0": "44c0197b39157fdd7a4dcc44767f9d6b0bb3977c7a8e347b8492f827fe9d9e5c48aca29b220b80b6a540cf994b9bc9c0",
    "rtmr1": "0084452c01668329d4bc06acdf58a7205c26743304509973949e5619bf81a6a7aea8c323c173019b3093d54e579e9378",
    "rtmr2": "d833feef2cd945148aa38ead2c53e9b7f138190aaaebfc551dccd829fc207aa3ba80b70870d7330733642e01d48c3132",
    "rtmr3": "00" * 48,
}
SNP_MEASUREMENT = "b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b6bdf8a9ece31a5a608eb0cf2e4872b01"

pytestmark = pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")


def snp_certificate_table() -> bytes:
    """The GHCB certificate table (what SNP's auxblob holds) of the real VCEK, ASK and ARK."""
    ask, ark = x509.load_pem_x509_certificates((EVIDENCE / "snp" / "ask_ark_milan.pem").read_bytes())
    ders = {
        "vcek": (EVIDENCE / "snp" / "vcek.der").read_bytes(),
        "ask": ask.public_bytes(Encoding.DER),
        "ark": ark.public_bytes(Encoding.DER),
    }
    offset = 24 * (len(ders) + 1)
    entries, blobs = b"", b""
    for name, der in ders.items():
        entries += struct.pack("<16sII", uuid.UUID(SNP_CERT_GUIDS[name]).bytes, offset + len(blobs), len(der))
        blobs += der
    return entries + bytes(24) + blobs


class FakeTsm:
    """The kernel's side of configfs-tsm, for one provider (see module docstring)."""

    def __init__(self, root: Path, provider: str, outblob: bytes, auxblob: bytes = b"", racing: bool = False) -> None:
        self.root, self.provider, self.outblob, self.auxblob = root, provider, outblob, auxblob
        self.racing = racing
        self.inblobs: list[bytes] = []
        self.privlevels: list[bytes] = []
        self.removed: list[str] = []
        root.mkdir(parents=True)

    def mkdir(self, entry: Path) -> None:
        os.mkdir(entry)  # EEXIST like configfs
        (entry / "provider").write_text(self.provider + "\n")
        (entry / "generation").write_text("0\n")
        (entry / "auxblob").write_bytes(self.auxblob)
        (entry / "privlevel").write_bytes(b"")
        os.mkfifo(entry / "inblob")
        os.mkfifo(entry / "outblob")
        threading.Thread(target=self._serve, args=(entry,), daemon=True).start()

    def _serve(self, entry: Path) -> None:
        try:
            self._answer(entry)
        except OSError:
            pass  # the entry went away (rmdir) before the producer asked

    def _answer(self, entry: Path) -> None:
        with open(entry / "inblob", "rb") as handle:  # blocks until the producer writes
            data = handle.read()
        if not data or len(data) > 64:
            return  # nothing written (rmdir woke us), or EINVAL: outblob never comes
        self.inblobs.append(data)
        privlevel = (entry / "privlevel").read_bytes()
        self.privlevels.append(privlevel)
        generation = 1 + (1 if privlevel else 0) + (1 if self.racing else 0)
        (entry / "generation").write_text(f"{generation}\n")
        with open(entry / "outblob", "wb") as handle:  # blocks until the producer reads
            handle.write(self.outblob)

    def rmdir(self, entry: Path) -> None:
        try:  # wake a server thread still waiting for an inblob that will not come
            os.close(os.open(entry / "inblob", os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        shutil.rmtree(entry)
        self.removed.append(entry.name)


def tdx_producer(tmp_path: Path, **fake: object) -> tuple[ConfigfsTsmEvidenceProducer, FakeTsm]:
    kernel = FakeTsm(tmp_path / "tsm" / "report", "tdx_guest", TDX_QUOTE, **fake)  # type: ignore[arg-type]
    return ConfigfsTsmEvidenceProducer("tdx", kernel.root, mkdir=kernel.mkdir, rmdir=kernel.rmdir), kernel


def snp_producer(tmp_path: Path, **fake: object) -> tuple[ConfigfsTsmEvidenceProducer, FakeTsm]:
    kernel = FakeTsm(tmp_path / "tsm" / "report", "sev_guest", SNP_REPORT, snp_certificate_table(), **fake)  # type: ignore[arg-type]
    return ConfigfsTsmEvidenceProducer(
        "sev-snp", kernel.root, privlevel=0, mkdir=kernel.mkdir, rmdir=kernel.rmdir
    ), kernel


def tdx_policy(**changes: str) -> Policy:
    values = {**TDX_MEASUREMENTS, **changes}
    return Policy(tee_types=("tdx",), measurements=Measurements(**{k: (v,) for k, v in values.items()}))


def snp_policy(vmpls: tuple[int, ...] = (0,), host_data: str = "00" * 32) -> Policy:
    # The sample report comes from a DEBUG guest (policy bit 19): allow_debug only for it.
    return Policy(
        tee_types=("sev-snp",),
        allow_debug=True,
        snp_vmpls=vmpls,
        measurements=Measurements(snp_measurement=(SNP_MEASUREMENT,), snp_host_data=(host_data,)),
    )


def ours() -> bytes:
    _, public = generate_keypair()
    return expected_report_data(public, os.urandom(32), "ab" * 32)


# --- TDX --------------------------------------------------------------------------------------


def test_tdx_quote_with_its_own_report_data_accepted(tmp_path: Path) -> None:
    producer, kernel = tdx_producer(tmp_path)
    own = TDX_QUOTE[TDX_RD]
    raw, aux = producer.evidence_parts(own)
    assert raw == TDX_QUOTE and aux == b""
    assert kernel.inblobs == [own] and kernel.privlevels == [b""]
    assert len(kernel.removed) == 1 and not any(kernel.root.iterdir())  # entry removed
    claims = verify(Evidence("tdx", raw, collateral=TDX_COLLATERAL), tdx_policy(), expected_report_data=own, now=TDX_AT)
    assert claims.tcb_status == "UpToDate" and claims.measurements["rtmr2"] == TDX_MEASUREMENTS["rtmr2"]


def test_tdx_quote_refused_with_our_report_data(tmp_path: Path) -> None:
    producer, kernel = tdx_producer(tmp_path)
    report_data = ours()
    with pytest.raises(EnclaveError, match="does not carry the report data"):
        producer.evidence(report_data)
    assert kernel.inblobs == [report_data] and len(kernel.removed) == 1
    # And the client's verifier refuses it too, at step 4, were the enclave to pass it on.
    with pytest.raises(PolicyRefusal, match="step 4"):
        verify(
            Evidence("tdx", TDX_QUOTE, collateral=TDX_COLLATERAL),
            tdx_policy(),
            expected_report_data=report_data,
            now=TDX_AT,
        )


def test_tdx_policy_pins_the_rtmrs(tmp_path: Path) -> None:
    evidence = Evidence("tdx", TDX_QUOTE, collateral=TDX_COLLATERAL)
    with pytest.raises(PolicyRefusal, match="rtmr1"):
        verify(evidence, tdx_policy(rtmr1="11" * 48), expected_report_data=None, now=TDX_AT)
    with pytest.raises(PolicyError, match="missing: rtmr0, rtmr1, rtmr2, rtmr3"):
        Policy(tee_types=("tdx",), measurements=Measurements(mrtd=(TDX_MEASUREMENTS["mrtd"],)))


def test_racing_writer_refused(tmp_path: Path) -> None:
    producer, kernel = tdx_producer(tmp_path, racing=True)
    with pytest.raises(EnclaveError, match="racing writer"):
        producer.evidence(TDX_QUOTE[TDX_RD])
    assert len(kernel.removed) == 1


def test_wrong_provider_and_no_configfs(tmp_path: Path) -> None:
    kernel = FakeTsm(tmp_path / "report", "sev_guest", SNP_REPORT)
    producer = ConfigfsTsmEvidenceProducer("tdx", kernel.root, mkdir=kernel.mkdir, rmdir=kernel.rmdir)
    with pytest.raises(EnclaveError, match="provider is 'sev_guest'"):
        producer.evidence(TDX_QUOTE[TDX_RD])
    assert len(kernel.removed) == 1
    with pytest.raises(EnclaveError, match="not in a CVM"):
        ConfigfsTsmEvidenceProducer("tdx", tmp_path / "missing").evidence(bytes(64))
    for bad in (b"", bytes(63), bytes(65)):
        with pytest.raises(EnclaveError, match="exactly 64"):
            producer.evidence(bad)
    with pytest.raises(EnclaveError, match="privlevel"):
        ConfigfsTsmEvidenceProducer("tdx", kernel.root, privlevel=0)


# --- SEV-SNP ----------------------------------------------------------------------------------


def test_snp_report_with_certificate_table_through_the_host(tmp_path: Path) -> None:
    """Producer -> EVIDENCE_OK body (report || table) -> host split -> envelope -> verifier."""
    producer, kernel = snp_producer(tmp_path)
    own = SNP_REPORT[SNP_RD]
    raw, aux = producer.evidence_parts(own)
    assert raw == SNP_REPORT and aux == snp_certificate_table()
    assert kernel.privlevels == [b"0"]  # written before inblob; generation counted both
    frame = Frame(MsgType.EVIDENCE_OK, 1, {"tee": "sev-snp", "aux_bytes": len(aux)}, raw + aux)
    tee, split_raw, certificates = split_evidence(frame)
    assert (tee, split_raw) == ("sev-snp", SNP_REPORT) and certificates is not None
    evidence = Evidence.from_json(encode_envelope(tee, split_raw, certificates=certificates))
    claims = verify(evidence, snp_policy(), expected_report_data=own, now=SNP_AT)
    assert claims.measurements["vmpl"] == "0"
    with pytest.raises(PolicyRefusal, match="VMPL 0"):
        verify(evidence, snp_policy(vmpls=(1,)), expected_report_data=own, now=SNP_AT)
    with pytest.raises(PolicyRefusal, match="snp_host_data"):
        verify(evidence, snp_policy(host_data="11" * 32), expected_report_data=own, now=SNP_AT)
    with pytest.raises(PolicyRefusal, match="step 4"):
        verify(evidence, snp_policy(), expected_report_data=ours(), now=SNP_AT)


def test_snp_refused_with_our_report_data(tmp_path: Path) -> None:
    producer, _ = snp_producer(tmp_path)
    with pytest.raises(EnclaveError, match="does not carry the report data"):
        producer.evidence(ours())


def test_malformed_certificate_table_refused_by_the_host() -> None:
    table = snp_certificate_table()
    for bad in (table[:30], bytes(8) + table[8:], table[: 24 * 4]):
        frame = Frame(MsgType.EVIDENCE_OK, 1, {"tee": "sev-snp", "aux_bytes": len(bad)}, SNP_REPORT + bad)
        with pytest.raises(EnclaveError):
            split_evidence(frame)
    with pytest.raises(EnclaveError, match="aux_bytes"):
        split_evidence(Frame(MsgType.EVIDENCE_OK, 1, {"tee": "sev-snp", "aux_bytes": 10**6}, SNP_REPORT))


def test_no_sealing_key_in_a_cvm() -> None:
    sealer = NoSealer("tdx")
    assert sealer.seal(b"k" * 32, "label") == b""
    with pytest.raises(CryptoError):
        sealer.unseal(b"", "label")
