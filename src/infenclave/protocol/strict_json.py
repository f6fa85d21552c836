"""The one strict JSON object reader, for every document that crosses a trust boundary.

Why strict: Python's `json` keeps the *last* of duplicate keys, another parser may keep the
first; a document read differently by signer and verifier (or by owner and enclave) is a
classic confusion attack. Duplicate keys are refused, the top level must be an object.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["loads_object"]


def loads_object(data: bytes | bytearray | memoryview, what: str, error: type[Exception]) -> dict[str, Any]:
    """Decode UTF-8 JSON into a dict, raising *error* (naming *what*) on anything else."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise error(f"{what}: duplicate key {key!r}")
            result[key] = value
        return result

    try:
        value = json.loads(bytes(data).decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise error(f"{what}: not valid UTF-8 JSON ({type(exc).__name__})") from exc
    if not isinstance(value, dict):
        raise error(f"{what}: expected a JSON object")
    return value
