"""infenclave: confidential image classification by ternary model partitioning.

The public names are imported lazily: the enclave program imports this package too, and it
is part of the measured trusted computing base, so importing it must not pull in torch, the
host or the client.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: The public surface, documented in docs/python-api.md (one example each).
_EXPORTS = {
    "Client": "infenclave.client",
    "load_model": "infenclave.models",
    "analyse": "infenclave.network",
    "ternary_split": "infenclave.split",
    "AssessOptions": "infenclave.assess.command",
    "run_assess": "infenclave.assess.command",
    "partition": "infenclave.bundle",
    "InfenclaveError": "infenclave.errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'infenclave' has no attribute {name!r}")
