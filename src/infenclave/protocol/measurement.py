"""The ``sim`` measurement: a SHA-256 over exactly the project modules the enclave program runs.

Why: under SGX the hardware measures the enclave (MRENCLAVE); the ``sim`` backend has no
hardware, so it measures what a reviewer would read: the Python source of every
``infenclave`` module the enclave program has imported. The set is *derived*, never listed
by hand: the enclave computes it from ``sys.modules`` once its imports are done, before any
secret exists. `infenclave partition` runs the same program with ``--measure`` in a fresh
interpreter to obtain the value for the starter policy. A module the program imports later
(inside a function) would escape the measurement: the test suite recomputes the set from the
source's import statements and fails if the two differ.

The trusted computing base may not grow into the host, the verifier, the assessment or the
model zoo: `untrusted_modules` names any such module, and the enclave refuses to start when
one is loaded.

Encoding (version 1): ``SHA-256( tag || for each file in sorted relative-path order:
u32be(len(path)) || path || u64be(len(content)) || content )`` where the path is the
``/``-separated path relative to the package directory, in UTF-8. The length framing makes
the encoding injective: moving bytes from one file into the next changes the digest.

Not measured, and said so in docs/serving.md: the interpreter, third-party packages (numpy,
onnxruntime, cryptography, Pillow, pyseccomp), and ``.pyc`` caches. Under Gramine those are
trusted files and enter MRENCLAVE; under ``sim`` nothing protects them from whoever owns them.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "MEASUREMENT_TAG",
    "UNTRUSTED_PACKAGES",
    "loaded_project_files",
    "measure_files",
    "package_dir",
    "untrusted_modules",
]

MEASUREMENT_TAG = b"infenclave/sim-measurement/v1\n"
#: Packages whose code must never run inside the enclave.
UNTRUSTED_PACKAGES = ("infenclave.host", "infenclave.attest", "infenclave.assess", "infenclave.models")
#: A source file of the enclave is a few tens of KiB; refuse something that is clearly not one.
_MAX_FILE_BYTES = 4 * 1024 * 1024


def package_dir() -> Path:
    """The directory of the installed ``infenclave`` package (the one that runs)."""
    return Path(__file__).resolve().parent.parent


def loaded_project_files(modules: Iterable[tuple[str, str | None]] | None = None) -> list[str]:
    """Sorted package-relative paths of the loaded ``infenclave`` modules' source files.

    *modules* is ``(name, file)`` pairs, by default every module in ``sys.modules``. A
    project module loaded from outside the package directory is refused (`ValueError`):
    its code could not be named in the measurement.
    """
    root = package_dir()
    if modules is None:
        modules = [(name, getattr(mod, "__file__", None)) for name, mod in list(sys.modules.items())]
    paths = set()
    for name, file in modules:
        if name != "infenclave" and not name.startswith("infenclave."):
            continue
        if file is None:
            raise ValueError(f"module {name} has no source file to measure")
        try:
            paths.add(Path(file).resolve().relative_to(root).as_posix())
        except ValueError as exc:
            raise ValueError(f"module {name} is loaded from outside the package") from exc
    return sorted(paths)


def untrusted_modules(names: Iterable[str]) -> list[str]:
    """The module names among *names* that belong to a package the enclave must never run."""
    return sorted(n for n in names if any(n == p or n.startswith(p + ".") for p in UNTRUSTED_PACKAGES))


def measure_files(paths: Iterable[str], root: Path | None = None) -> bytes:
    """The 32-byte measurement of the package-relative *paths* under *root* (see encoding)."""
    root = package_dir() if root is None else root
    digest = hashlib.sha256(MEASUREMENT_TAG)
    for rel in sorted(paths):
        content = _read(root / rel)
        path = rel.encode("utf-8")
        digest.update(struct.pack(">I", len(path)) + path)
        digest.update(struct.pack(">Q", len(content)) + content)
    return digest.digest()


def _read(path: Path) -> bytes:
    with open(path, "rb") as handle:
        data = handle.read(_MAX_FILE_BYTES + 1)
    if len(data) > _MAX_FILE_BYTES:
        raise ValueError(f"{path} is larger than {_MAX_FILE_BYTES} bytes: not an enclave source file")
    return data
