"""Enclave workers elsewhere: the host's TCP connection to ``python -m infenclave.enclave
--listen HOST:PORT`` (``serve --enclave HOST:PORT``); untrusted.

The frames are those of the local socketpair (`protocol.frames`), tensors raw; what changes
is only the transport, so every check (evidence binding, provisioning, IR2 checks) is the
same. The enclave accepts, the host connects: the enclave never opens a connection. A
`RemoteEnclave` stands in for the worker process in the pool's supervision: it "exits" when
the connection ends, and the pool then reconnects (the enclave serves the next connection
with a fresh program and key, so clients attest again, as after a local worker restart).
"""

from __future__ import annotations

import asyncio
import socket

from infenclave.errors import ServerError

__all__ = ["RemoteEnclave", "connect_remote", "parse_address"]

#: Socket buffers large enough that one IR tensor (~100-300 KiB) moves in one go.
_SOCKET_BUFFER = 4 * 1024 * 1024
#: How often `RemoteEnclave.wait` looks whether the connection has ended.
_POLL_S = 0.1


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ServerError(f"an enclave address is HOST:PORT, not {address!r}")
    return host.strip("[]"), int(port)


class RemoteEnclave:
    """The part of `asyncio.subprocess.Process` the pool uses, for a TCP-connected enclave."""

    def __init__(self, address: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.address = address
        self.pid = 0  # not a local process
        self.returncode: int | None = None
        self._reader, self._writer = reader, writer

    async def wait(self) -> int:
        """Return once the connection has ended (0)."""
        while not self._reader.at_eof() and not self._writer.is_closing():
            await asyncio.sleep(_POLL_S)
        self.returncode = 0
        return 0

    def kill(self) -> None:
        """Drop the connection (the enclave goes back to accepting)."""
        self._writer.close()
        self.returncode = 0


async def connect_remote(
    address: str, timeout: float
) -> tuple[RemoteEnclave, asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a listening enclave; returns the process stand-in and the stream pair."""
    host, port = parse_address(address)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=2**20), timeout)
    except (TimeoutError, OSError) as exc:
        raise ServerError(f"cannot connect to the enclave at {address}") from exc
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
    return RemoteEnclave(address, reader, writer), reader, writer
