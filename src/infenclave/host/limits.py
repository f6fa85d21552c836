"""A header-read deadline for the host's HTTP server (uvicorn has none).

uvicorn closes an *idle* keep-alive connection after ``timeout_keep_alive``, but cancels that
timer on every byte received: a client that sends its request head one byte every few
seconds (slowloris) holds its connection, and a slot of ``limit_concurrency``, for ever. Each
such connection costs the server little, but a few thousand of them fill the connection
limit and every other client gets 503.

The fix is the one web servers use (nginx ``client_header_timeout``, Apache
``mod_reqtimeout``): a deadline for the whole request head, from the moment the connection
opens (or the previous response ends) to the moment the head is complete; a connection that
misses it is answered ``408 Request Timeout`` and closed. It is done here as a subclass of
uvicorn's own h11 protocol (`HeaderDeadlineH11Protocol`), which adds one timer per connection
and changes nothing else, rather than with a front proxy: no second process to deploy and
supervise, and the limit holds wherever ``infenclave serve`` runs.

Not covered: a slow *body* (the head complete, the body trickling in) is bounded only by the
connection limit and the body size limit; the request deadline (``--timeout``) starts once
the body is read.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["HEADER_TIMEOUT_S", "HeaderDeadlineH11Protocol", "with_header_timeout"]

#: Seconds a client has to send a complete request head (nginx's default is 60; a client of
#: this API sends a few hundred bytes of headers, and 10 s covers a bad mobile link).
HEADER_TIMEOUT_S = 10.0

_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\n"
    b"content-length: 25\r\nconnection: close\r\n\r\nrequest header timed out\n"
)


class HeaderDeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head."""

    header_timeout: float = HEADER_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the head is complete (or the peer is done)
            self._disarm_header_deadline()

    def on_response_complete(self) -> None:
        # Armed before the base class parses a pipelined next request (which disarms it).
        self._arm_header_deadline()
        super().on_response_complete()

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_timer = self.loop.call_later(self.header_timeout, self._on_header_deadline)

    def _disarm_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_deadline(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.our_state is h11.IDLE:  # nothing of a response was sent on this cycle
            self.transport.write(_TIMEOUT_RESPONSE)
        self.transport.close()


def with_header_timeout(seconds: float) -> type[HeaderDeadlineH11Protocol]:
    """The protocol class for uvicorn's ``http=`` with a header deadline of *seconds*."""
    if not seconds > 0:
        raise ValueError("the header timeout must be positive")
    return type("HeaderDeadlineH11Protocol", (HeaderDeadlineH11Protocol,), {"header_timeout": float(seconds)})
