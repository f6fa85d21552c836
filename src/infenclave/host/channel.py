"""The host's end of the local channel to one enclave worker (asyncio, framed, bounded).

The frame format is `infenclave.protocol.frames` (24-byte header, small JSON metadata, raw
body); this module adds what the untrusted side needs: non-blocking reads of whole frames
with the size limits checked from the header, request/response matching by tag, and an
optional *tap* that records every frame in and out (for the test that checks what the host
sees; it records bytes the host has anyway, so it reveals nothing new).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import struct
import threading
from pathlib import Path
from typing import Any, BinaryIO

from infenclave.errors import EnclaveError
from infenclave.protocol.frames import (
    HEADER,
    Frame,
    MsgType,
    decode_header,
    decode_meta,
    encode_frame,
)

__all__ = ["ChannelClosed", "ChannelTap", "EnclaveChannel", "TAP_ENV"]

#: Environment variable naming a directory where every channel frame is recorded (tests).
TAP_ENV = "INFENCLAVE_HOST_TAP"


class ChannelClosed(EnclaveError):
    """The enclave worker went away (crashed, killed or closed the channel)."""


class ChannelTap:
    """Append-only record of frames: ``u8 direction | u32 length | frame bytes`` per frame."""

    def __init__(self, directory: Path, name: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO = open(directory / f"channel-{name}-{os.getpid()}.bin", "ab")
        self._lock = threading.Lock()

    def record(self, direction: str, buffers: list[bytes | memoryview]) -> None:
        """Record one frame; *direction* is ``"out"`` (host -> enclave) or ``"in"``."""
        data = b"".join(bytes(b) for b in buffers)
        with self._lock:
            self._file.write(struct.pack(">BI", 0 if direction == "out" else 1, len(data)) + data)
            self._file.flush()

    @staticmethod
    def from_env(name: str) -> ChannelTap | None:
        """A tap when `TAP_ENV` is set, else None."""
        directory = os.environ.get(TAP_ENV)
        return ChannelTap(Path(directory), name) if directory else None


class EnclaveChannel:
    """Frames to and from one enclave worker over an asyncio stream pair.

    `call` sends a frame and waits for the enclave's frame with the same tag. Frames with
    tag 0 are unsolicited (HELLO) and go to `hello`. When the stream ends every waiter fails
    with `ChannelClosed`, so no request hangs on a dead worker.
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tap: ChannelTap | None = None
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._tap = tap
        self._tags = itertools.count(1)
        self._waiters: dict[int, asyncio.Future[Frame]] = {}
        self._hello: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._closed: BaseException | None = None
        self._read_task = asyncio.create_task(self._read_loop())

    @property
    def closed(self) -> bool:
        """True once the worker's end is gone."""
        return self._closed is not None

    async def hello(self, timeout: float) -> Frame:
        """Wait for the enclave's HELLO frame."""
        return await asyncio.wait_for(asyncio.shield(self._hello), timeout)

    def new_tag(self) -> int:
        """A fresh tag for a call (tags are never reused on one channel)."""
        return next(self._tags)

    async def call(
        self,
        msg: MsgType,
        meta: dict[str, Any] | None = None,
        body: bytes | memoryview = b"",
        *,
        tag: int | None = None,
        timeout: float = 30.0,
    ) -> Frame:
        """Send a frame and return the enclave's answer with the same tag.

        Raises `ChannelClosed` if the worker dies first, `EnclaveError` on an ERROR frame,
        and `asyncio.TimeoutError` after *timeout* seconds.
        """
        if self._closed is not None:
            raise ChannelClosed("the enclave worker is gone")
        tag = self.new_tag() if tag is None else tag
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._waiters[tag] = future
        try:
            buffers = encode_frame(msg, tag, meta, body)
            if self._tap is not None:
                self._tap.record("out", buffers)
            for buf in buffers:
                if len(buf):
                    self._writer.write(buf)
            await self._writer.drain()
            frame = await asyncio.wait_for(future, timeout)
        except (ConnectionError, BrokenPipeError) as exc:
            raise ChannelClosed("the enclave worker is gone") from exc
        finally:
            self._waiters.pop(tag, None)
        if frame.type == MsgType.ERROR:
            raise EnclaveRefused(str(frame.meta.get("error", "error")))
        return frame

    async def _read_loop(self) -> None:
        reason: BaseException = ChannelClosed("the enclave worker closed the channel")
        try:
            while True:
                header = await self._reader.readexactly(HEADER.size)
                msg, tag, meta_len, body_len = decode_header(header)
                meta_raw = await self._reader.readexactly(meta_len) if meta_len else b""
                body = await self._reader.readexactly(body_len) if body_len else b""
                if self._tap is not None:
                    self._tap.record("in", [header, meta_raw, body])
                frame = Frame(msg, tag, decode_meta(meta_raw), body)
                if msg == MsgType.HELLO and tag == 0:
                    if not self._hello.done():
                        self._hello.set_result(frame)
                    continue
                waiter = self._waiters.get(tag)
                if waiter is not None and not waiter.done():
                    waiter.set_result(frame)
        except asyncio.IncompleteReadError:
            pass
        except (ConnectionError, EnclaveError) as exc:
            reason = ChannelClosed(f"the enclave channel broke ({type(exc).__name__})")
        except asyncio.CancelledError:
            reason = ChannelClosed("the channel was closed by the host")
        finally:
            self._closed = reason
            for waiter in list(self._waiters.values()):
                if not waiter.done():
                    waiter.set_exception(ChannelClosed(str(reason)))
            if not self._hello.done():
                self._hello.set_exception(ChannelClosed(str(reason)))
                self._hello.exception()  # mark retrieved: no "never retrieved" warning

    async def wait_closed(self) -> None:
        """Wait until the read loop has ended (the worker's end is gone)."""
        await asyncio.shield(self._read_task)

    def close(self) -> None:
        """Close the host's end; the worker sees EOF and exits."""
        self._writer.close()
        self._read_task.cancel()


class EnclaveRefused(EnclaveError):
    """The enclave answered with an ERROR frame; `code` is its opaque reason code."""

    def __init__(self, code: str) -> None:
        super().__init__(f"the enclave refused ({code})")
        self.code = code
