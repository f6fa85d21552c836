"""Frames on the local channel between the untrusted host and the enclave program.

Why a binary framing and not HTTP or JSON: tensors (IR1 going out, IR2 coming in) are
100-300 KiB per image and cross this channel twice per request; they travel as their raw
bytes, written from and read into one buffer each, never encoded. Only the small
metadata (request id, dtype, shape, stage timings) is JSON.

A frame is::

    header (24 bytes, big-endian): magic b"IEF1" | type u8 | flags u8 (0) | reserved u16 (0)
                                   | tag u64 | meta_len u32 | body_len u32
    meta   meta_len bytes of UTF-8 JSON object (may be empty: meta_len 0)
    body   body_len raw bytes (a ciphertext, raw evidence, or a tensor's C-order data)

``tag`` is chosen by the host and echoed by the enclave, so several requests can be in
flight at once. Both lengths are bounded (`MAX_META_BYTES`, `MAX_BODY_BYTES`) and checked
from the header, before anything is allocated or read.

Why a socketpair and not shared memory: a tensor is copied once by the kernel each way
(~20-60 us for 125-250 KiB here) against milliseconds of ONNX Runtime work per stage;
shared memory would save that copy but add a synchronisation protocol to the TCB.
"""

from __future__ import annotations

import json
import os
import select
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np

from infenclave.errors import EnclaveError
from infenclave.protocol.strict_json import loads_object

__all__ = [
    "HEADER",
    "MAGIC",
    "MAX_BODY_BYTES",
    "MAX_META_BYTES",
    "MAX_OTHER_BODY_BYTES",
    "SEALED_STATE_UNOPENABLE",
    "Frame",
    "FrameReader",
    "MsgType",
    "body_limit",
    "decode_header",
    "encode_frame",
    "encode_tensors_frame",
    "tensor_from_frame",
    "tensor_meta",
    "tensors_from_frame",
    "tensors_meta",
    "write_frame",
]

MAGIC = b"IEF1"
HEADER = struct.Struct(">4sBBHQII")
#: Metadata is a handful of small fields.
MAX_META_BYTES = 64 * 1024
#: The largest bodies: a sealed request (an image of at most 32 MiB plus HPKE overhead) and
#: a verified IR2 frame (IR2 plus the BackNet's checked intermediates: ~11 MiB for Lite0 cut
#: after block 3, ~100 MiB for an early cut of Lite2).
MAX_BODY_BYTES = 256 * 1024 * 1024
#: Every other frame: a sealed request (32 MiB image plus overhead) is the largest. Only IR2
#: frames may use `MAX_BODY_BYTES`, so that a host cannot make the enclave allocate 256 MiB
#: per frame of any other type.
MAX_OTHER_BODY_BYTES = 33 * 1024 * 1024
#: Tensors in one multi-tensor frame (IR2 and the checked intermediates; ResNet-50: ~60).
MAX_TENSORS = 1024

_DTYPES = {"float32": np.dtype("<f4")}
#: Tensors on the channel are at most 4-D, each dimension bounded.
_MAX_DIMS = 4
_MAX_DIM = 1 << 16


class MsgType(IntEnum):
    """Frame types. Host -> enclave first, then enclave -> host."""

    EVIDENCE = 1  # meta {nonce}: evidence binding SHA-256(public key || nonce)
    LOAD = 2  # meta {bundle}: read and parse the named bundle's manifest
    PROVISION = 3  # body: model key sealed (HPKE) to this enclave's public key
    UNSEAL = 4  # body: the sealed model key blob from an earlier provisioning
    REQUEST = 5  # meta {request_id}; body: the client's sealed request
    IR2 = 6  # meta {dtype, shape}; body: BackNet output for `tag`

    HELLO = 64  # meta {public_key, tee, measurement, sandbox, pid}: sent once at start
    EVIDENCE_OK = 65  # body: raw evidence
    LOADED = 66  # meta {model_id, provisioned}
    PROVISIONED = 67  # body: sealed model key blob, for the host to store
    UNSEALED = 68
    IR1 = 69  # meta {dtype, shape, t}; body: FrontNet output for `tag`
    RESULT = 70  # meta {t}; body: the result sealed to the client's ephemeral key
    ERROR = 71  # meta {error}: an opaque error code, never a secret


#: ERROR code for UNSEAL: the stored sealed blob does not open in this enclave (another build,
#: a TCB or microcode update, corruption). The host sets the blob aside and serves
#: unprovisioned until the owner provisions again; restarting the worker cannot help.
SEALED_STATE_UNOPENABLE = "sealed_state_unopenable"


@dataclass
class Frame:
    """One decoded frame; `body` may be a memoryview of the reader's buffer."""

    type: MsgType
    tag: int
    meta: dict[str, Any] = field(default_factory=dict)
    body: bytes | bytearray | memoryview = b""


def body_limit(msg: MsgType) -> int:
    """The largest body a frame of type *msg* may carry."""
    return MAX_BODY_BYTES if msg == MsgType.IR2 else MAX_OTHER_BODY_BYTES


def encode_header(msg: MsgType, tag: int, meta_len: int, body_len: int) -> bytes:
    """Pack a frame header after checking the limits."""
    if meta_len > MAX_META_BYTES or body_len > body_limit(msg):
        raise EnclaveError("frame larger than the channel limits")
    return HEADER.pack(MAGIC, int(msg), 0, 0, tag, meta_len, body_len)


def decode_header(header: bytes | bytearray | memoryview) -> tuple[MsgType, int, int, int]:
    """Unpack and check a header: (type, tag, meta_len, body_len)."""
    magic, msg, flags, reserved, tag, meta_len, body_len = HEADER.unpack(header)
    if magic != MAGIC or flags != 0 or reserved != 0:
        raise EnclaveError("channel: bad frame header")
    if meta_len > MAX_META_BYTES or body_len > MAX_BODY_BYTES:
        raise EnclaveError("channel: frame larger than the limits")
    try:
        kind = MsgType(msg)
    except ValueError as exc:
        raise EnclaveError("channel: unknown frame type") from exc
    if body_len > body_limit(kind):
        raise EnclaveError("channel: frame larger than the limits")
    return kind, tag, meta_len, body_len


def encode_meta(meta: dict[str, Any] | None) -> bytes:
    """JSON-encode metadata (compact); empty for no metadata."""
    if not meta:
        return b""
    return json.dumps(meta, separators=(",", ":")).encode("utf-8")


def decode_meta(raw: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Decode metadata; an empty section is an empty dict."""
    if not raw:
        return {}
    return loads_object(raw, "channel: frame metadata", EnclaveError)


def encode_frame(
    msg: MsgType, tag: int, meta: dict[str, Any] | None = None, body: bytes | memoryview = b""
) -> list[bytes | memoryview]:
    """Return the frame as buffers to write in order (the body is not copied)."""
    meta_raw = encode_meta(meta)
    body_view = memoryview(body).cast("B") if not isinstance(body, bytes) else body
    return [encode_header(msg, tag, len(meta_raw), len(body_view)), meta_raw, body_view]


def tensor_meta(array: np.ndarray, **extra: Any) -> dict[str, Any]:
    """Metadata describing a float32 C-order tensor (its bytes go in the body)."""
    if array.dtype != np.float32 or not array.flags.c_contiguous:
        raise EnclaveError("channel: tensors travel as C-contiguous float32")
    return {"dtype": "float32", "shape": list(array.shape), **extra}


def tensor_from_frame(frame: Frame, expected_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """View a tensor frame's body as an array (no copy), checking dtype, shape and size."""
    meta = frame.meta
    dtype = _DTYPES.get(str(meta.get("dtype")))
    shape = meta.get("shape")
    if dtype is None:
        raise EnclaveError("channel: unsupported tensor dtype")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= _MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= _MAX_DIM for d in shape)
    ):
        raise EnclaveError("channel: bad tensor shape")
    if expected_shape is not None and tuple(shape) != tuple(expected_shape):
        raise EnclaveError("channel: tensor shape differs from the expected one")
    count = 1
    for d in shape:
        count *= d
    if count * dtype.itemsize != len(frame.body):
        raise EnclaveError("channel: tensor body size does not match its shape")
    return np.frombuffer(frame.body, dtype=dtype).reshape(shape)


def encode_tensors_frame(msg: MsgType, tag: int, arrays: list[np.ndarray], **extra: Any) -> list[bytes | memoryview]:
    """A multi-tensor frame: meta ``{dtype, shapes}``, body the tensors' raw bytes in order."""
    if not 1 <= len(arrays) <= MAX_TENSORS:
        raise EnclaveError("channel: too many tensors for one frame")
    meta = encode_meta(tensors_meta(arrays, **extra))
    views = [a.data.cast("B") for a in arrays]
    return [encode_header(msg, tag, len(meta), sum(len(v) for v in views)), meta, *views]


def tensors_meta(arrays: list[np.ndarray], **extra: Any) -> dict[str, Any]:
    """Metadata of a multi-tensor frame (float32, C-contiguous tensors; bytes in the body)."""
    if not 1 <= len(arrays) <= MAX_TENSORS:
        raise EnclaveError("channel: too many tensors for one frame")
    for a in arrays:
        tensor_meta(a)
    return {"dtype": "float32", "shapes": [list(a.shape) for a in arrays], **extra}


def tensors_from_frame(frame: Frame, expected_shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Views of a multi-tensor frame's tensors; count, shapes and size must be exactly expected."""
    meta = frame.meta
    shapes = meta.get("shapes")
    if meta.get("dtype") != "float32" or not isinstance(shapes, list) or len(shapes) != len(expected_shapes):
        raise EnclaveError("channel: multi-tensor frame with the wrong dtype or tensor count")
    if [tuple(s) if isinstance(s, list) else None for s in shapes] != [tuple(s) for s in expected_shapes]:
        raise EnclaveError("channel: tensor shapes differ from the expected ones")
    sizes = [4 * int(np.prod(s, dtype=np.int64)) for s in expected_shapes]
    if sum(sizes) != len(frame.body):
        raise EnclaveError("channel: tensor body size does not match the shapes")
    out, pos = [], 0
    for shape, size in zip(expected_shapes, sizes):
        out.append(np.frombuffer(frame.body, dtype="<f4", count=size // 4, offset=pos).reshape(shape))
        pos += size
    return out


def write_frame(fd: int, buffers: list[bytes | memoryview]) -> None:
    """Write every buffer to a blocking fd, handling short writes (enclave side)."""
    views = [memoryview(b) for b in buffers if len(b)]
    while views:
        written = os.writev(fd, views)
        while written:
            if written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][written:]
                written = 0


class FrameReader:
    """Blocking frame reader over a file descriptor (enclave side).

    Each frame's body is read into a fresh buffer of exactly its size (bounded by the
    header check), so a tensor can be viewed in place with `tensor_from_frame`.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def _read_exact(self, size: int) -> bytearray | None:
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            n = os.readv(self._fd, [view[got:]])
            if n == 0:
                if got == 0:
                    return None
                raise EnclaveError("channel: closed in the middle of a frame")
            got += n
        return buf

    def read(self) -> Frame | None:
        """Return the next frame, or None when the host closed the channel cleanly."""
        header = self._read_exact(HEADER.size)
        if header is None:
            return None
        msg, tag, meta_len, body_len = decode_header(header)
        meta_raw = self._read_exact(meta_len) if meta_len else bytearray()
        body = self._read_exact(body_len) if body_len else bytearray()
        if meta_raw is None or body is None:
            raise EnclaveError("channel: closed in the middle of a frame")
        return Frame(msg, tag, decode_meta(meta_raw), body)

    def read_available(self, limit: int) -> list[Frame] | None:
        """Block for one frame, then take up to *limit* - 1 more that are already waiting.

        Returns None when the host closed the channel before a first frame. Lets the enclave
        batch the FrontNet over requests that queued while it was busy.
        """
        first = self.read()
        if first is None:
            return None
        frames = [first]
        while len(frames) < limit and select.select([self._fd], [], [], 0)[0]:
            frame = self.read()
            if frame is None:
                break
            frames.append(frame)
        return frames
