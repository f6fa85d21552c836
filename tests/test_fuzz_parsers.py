"""Property-based fuzzing of every parser that reads bytes an attacker chooses.

The property, for each target: any input either parses or is refused with the project's
error root (`InfenclaveError`: a clear refusal the caller maps to one code), never another
exception (an ``IndexError``, ``struct.error``, ``KeyError``, ``UnicodeDecodeError``... is
a parser bug: the caller's error mapping would not catch it), and never hangs.

Inputs are Hypothesis byte strings: half arbitrary, half a valid seed (real SGX/TDX quotes
and an SNP report from ``tests/data/evidence``, frames, messages, a manifest, sim evidence
and small images the project makes itself) with a few random edits: byte overwrites,
deletions, insertions, truncations and boundary integers (0, 1, 2^31, 2^32 - 1, the input's
length) written over a length field.

Targets: the enclave's frame reader (over a real pipe, as the enclave reads its channel),
the request message, the bundle manifest and the Tail container, the evidence envelope and
sim evidence, SGX/TDX quotes and SNP reports (the verifier's parsers), and the image
decoder. Here: a short run per target (`EXAMPLES`); ``bench/fuzz.py`` runs >= 100,000
inputs per target and writes ``bench/results/fuzz.json``.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infenclave.errors import InfenclaveError

#: Examples per target in the test suite (the whole file runs in well under a minute).
EXAMPLES = 300
#: Inputs are at most this long (a pipe holds 64 KiB, so the frame target never blocks).
MAX_INPUT = 16 * 1024
_EVIDENCE = Path(__file__).parent / "data" / "evidence"
_BOUNDARY = (0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)


@dataclass(frozen=True)
class Target:
    """A parser under fuzz: its seeds and a call that parses one input."""

    name: str
    seeds: tuple[bytes, ...]
    parse: Callable[[bytes], object]


# --- the parsers, called as their callers call them ------------------------------------


def _parse_frames(data: bytes) -> object:
    """The enclave's `FrameReader` on a pipe holding *data*, then EOF: read until the end."""
    from infenclave.protocol.frames import FrameReader, tensor_from_frame

    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, data)
        os.close(write_fd)
        write_fd = -1
        reader = FrameReader(read_fd)
        frames = []
        while (frame := reader.read()) is not None:
            if "dtype" in frame.meta or "shape" in frame.meta:
                tensor_from_frame(frame)
            frames.append(frame)
        return frames
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)


def _parse_request(data: bytes) -> object:
    from infenclave.protocol.messages import decode_request

    return decode_request(data)


def _parse_manifest(data: bytes) -> object:
    from infenclave.protocol.bundle_format import parse_manifest

    return parse_manifest(data)


def _parse_tail(data: bytes) -> object:
    from infenclave.protocol.bundle_format import decode_tail

    return decode_tail(data, 3)


def _parse_sim_evidence(data: bytes) -> object:
    from infenclave.attest._sim import parse_sim_evidence

    return parse_sim_evidence(data)


def _parse_envelope(data: bytes) -> object:
    from infenclave.protocol.envelope import decode_envelope

    return decode_envelope(data)


def _parse_quote(data: bytes) -> object:
    from infenclave.attest._quote import parse_quote

    return parse_quote(data)


def _parse_snp(data: bytes) -> object:
    from infenclave.attest._snp import parse_snp_report

    return parse_snp_report(data)


def _parse_image(data: bytes) -> object:
    from infenclave.enclave.imaging import decode_image

    return decode_image(data)


# --- seeds -------------------------------------------------------------------------------


def _frame_seeds() -> tuple[bytes, ...]:
    import numpy as np

    from infenclave.protocol.frames import MsgType, encode_frame, tensor_meta

    ir = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)
    frames = [
        encode_frame(MsgType.IR2, 7, tensor_meta(ir), memoryview(ir).cast("B")),
        encode_frame(MsgType.LOAD, 1, {"bundle": "model"}),
        encode_frame(MsgType.REQUEST, 2, {"request_id": "ab" * 16}, b"\x01" * 64),
    ]
    return tuple(b"".join(bytes(part) for part in frame) for frame in frames)


def _request_seeds() -> tuple[bytes, ...]:
    from infenclave.protocol.messages import encode_request

    return (encode_request(_png(16, 16), bytes(range(32)), 5),)


def _manifest_seeds() -> tuple[bytes, ...]:
    from infenclave.protocol import bundle_format as bf

    part = {"sha256": "0" * 64, "size": 10}
    doc = {
        "format": bf.BUNDLE_FORMAT,
        "model": {"name": "efficientnet-lite0"},
        "preprocess": {"resize": 256, "crop": 224, "mean": [127, 127, 127], "std": [128, 128, 128]},
        "output": "logits",
        "num_classes": 1000,
        "input_shape": [3, 224, 224],
        "cuts": {
            "front_end": {"name": "_blocks.3", "tensor": "ir1", "shape": [40, 28, 28]},
            "tail_start": {"name": "_conv_head", "tensor": "ir2", "shape": [320, 7, 7]},
        },
        "parts": {
            name: {"file": file, "encrypted": name in bf.ENCRYPTED_PARTS, **part}
            for name, file in bf.PART_FILES.items()
            if name != "model"  # the whole-model bundle's one part (seeded below)
        },
    }
    keys = getattr(bf, "_MANIFEST_KEYS", ())
    if "owner_key" in keys:
        doc["owner_key"] = "ab" * 32
    if "deployment" in keys:
        doc["deployment"] = "partitioned"
    sections = [None]
    if "backnet" in keys:  # both BackNet modes: unverified, and Freivalds-verified
        from infenclave.protocol.backnet_verify import VERIFY_FILE

        sections = [
            {"verification": "unverified"},
            {"verification": "freivalds", "max_failures": 1, "file": VERIFY_FILE, "sha256": "1" * 64, "size": 4096},
        ]
    seeds = []
    for section in sections:
        if section is not None:
            doc["backnet"] = section
        seeds.append((json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
    if "deployment" in keys:  # the whole model in the enclave: one part, no cuts, no BackNet
        whole = dict(doc, deployment="whole-model-in-enclave", cuts=None, backnet=None)
        whole["parts"] = {"model": {"file": "model.bin.enc", "encrypted": True, **part}}
        seeds.append((json.dumps(whole, indent=2, sort_keys=True) + "\n").encode())
    return tuple(seeds)


def _tail_seeds() -> tuple[bytes, ...]:
    from infenclave.protocol.bundle_format import encode_tail

    return (encode_tail(b"\x08\x07onnx-model-bytes", ["cat", "dog", "tabby"]),)


def _sim_evidence_seeds() -> tuple[bytes, ...]:
    from infenclave.enclave.evidence import SimEvidenceProducer

    with tempfile.TemporaryDirectory() as state:
        return (SimEvidenceProducer(Path(state), bytes(32)).evidence(bytes(64)),)


def _envelope_seeds() -> tuple[bytes, ...]:
    from infenclave.protocol.envelope import encode_envelope

    raw = _sim_evidence_seeds()[0]
    encoded = encode_envelope("simulated", raw)
    return (encoded if isinstance(encoded, bytes) else json.dumps(encoded).encode(),)


def _files(*names: str) -> tuple[bytes, ...]:
    return tuple((_EVIDENCE / name).read_bytes() for name in names)


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 90)).save(out, "PNG")
    return out.getvalue()


def _image_seeds() -> tuple[bytes, ...]:
    from PIL import Image

    seeds = [_png(16, 12)]
    for fmt, mode in (
        ("JPEG", "RGB"),
        ("GIF", "P"),
        ("BMP", "RGB"),
        ("WEBP", "RGB"),
        ("TIFF", "RGB"),
        ("PNG", "RGBA"),
        ("PNG", "I;16"),
    ):
        out = io.BytesIO()
        Image.new(mode, (24, 16)).save(out, fmt)
        seeds.append(out.getvalue())
    return tuple(seeds)


def targets() -> list[Target]:
    """Every fuzz target with its seeds (built here, from real formats)."""
    return [
        Target("frame", _frame_seeds(), _parse_frames),
        Target("request_message", _request_seeds(), _parse_request),
        Target("bundle_manifest", _manifest_seeds(), _parse_manifest),
        Target("tail_container", _tail_seeds(), _parse_tail),
        Target("evidence_envelope", _envelope_seeds(), _parse_envelope),
        Target("sim_evidence", _sim_evidence_seeds(), _parse_sim_evidence),
        Target("sgx_tdx_quote", _files("sgx/sgx_quote", "tdx/tdx_quote"), _parse_quote),
        Target("snp_report", _files("snp/attestation.bin"), _parse_snp),
        Target("image_decoder", _image_seeds(), _parse_image),
    ]


# --- inputs ------------------------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, seeds: tuple[bytes, ...]) -> bytes:
    """A seed with 1-8 random edits, or (half the time) arbitrary bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=512))
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        op = draw(st.integers(0, 4))
        if op == 0 and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == 1:
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == 2:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        elif op == 3:
            del data[pos:]
        else:
            value = draw(st.sampled_from((*_BOUNDARY, len(data))))
            fmt = draw(st.sampled_from(("<I", ">I", "<H", ">H", "<Q")))
            packed = struct.pack(fmt, value & ((1 << (8 * struct.calcsize(fmt))) - 1))
            data[pos : pos + len(packed)] = packed
    return bytes(data[:MAX_INPUT])


def check_one(target: Target, data: bytes) -> None:
    """The property: parsed, or refused with `InfenclaveError`; anything else propagates."""
    try:
        target.parse(data)
    except InfenclaveError:
        pass


_TARGETS = {t.name: t for t in targets()}


@pytest.mark.parametrize("name", sorted(_TARGETS))
def test_seeds_are_accepted_or_refused_cleanly(name: str) -> None:
    for seed in _TARGETS[name].seeds:
        check_one(_TARGETS[name], seed)


@pytest.mark.parametrize("name", sorted(_TARGETS))
def test_parser_refuses_hostile_bytes_cleanly(name: str) -> None:
    target = _TARGETS[name]

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(mutated(target.seeds))
    def run(data: bytes) -> None:
        check_one(target, data)

    run()
