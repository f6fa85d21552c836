"""The one bounded file reader: every file a user or a peer hands us is read with a limit.

Why a limit on every read: a path can name a device (`/dev/zero`), a FIFO or a multi-gigabyte
file by mistake or by malice; reading ``limit + 1`` bytes decides "too large" without ever
holding more than that. Each caller says which error a missing file and a too-large file
raise, so that the CLI's exit code stays that of its layer (`infenclave.errors.ExitCode`).
"""

from __future__ import annotations

from pathlib import Path

from infenclave.errors import InfenclaveError

__all__ = ["read_bounded"]


def read_bounded(
    path: Path,
    limit: int,
    what: str,
    error: type[InfenclaveError],
    too_large: type[InfenclaveError] | None = None,
) -> bytes:
    """Read at most *limit* bytes of *path* (the *what* named in messages).

    A missing or unreadable file (a directory included) raises *error*; a file over *limit*
    bytes raises *too_large* (default: *error*).
    """
    try:
        with Path(path).open("rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if len(data) > limit:
        raise (too_large or error)(f"{what} {path} is larger than the {limit}-byte limit")
    return data
