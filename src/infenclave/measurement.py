"""The ``sim`` measurement: a SHA-256 over the enclave program's own source files.

Why: under SGX the hardware measures the enclave (MRENCLAVE); the ``sim`` backend has no
hardware, so it measures what a reviewer would read: the exact Python files the enclave
program executes. `infenclave partition` computes it on the owner's machine (it goes into the
starter policy) and the enclave computes it again at start (it goes into its evidence and
into its sealing key), with this one function, so both agree byte for byte.

What is measured (`MEASURED_FILES`), relative to the ``infenclave`` package directory:

- every ``.py`` file under ``enclave/`` (the program itself), recursively;
- the few project modules the enclave imports from outside ``enclave/``: ``__init__.py``
  (a package ``__init__`` runs on import), ``errors.py``, ``crypto.py``,
  ``attest/sim_format.py`` and this file (it decides what is measured).

``infenclave.attest``'s ``__init__`` is deliberately *not* executed by the enclave (see
`infenclave.enclave.__main__`), so the verifier stays out of the TCB.

The enclave also checks, once its imports are done, that every ``infenclave`` module it has
loaded is one of these files (`check_loaded_modules`), and refuses to start otherwise: a
measurement that does not cover the code that runs would be a lie.

Encoding (version 1): ``SHA-256( tag || for each file in sorted relative-path order:
u32be(len(path)) || path || u64be(len(content)) || content )`` where the path is the
``/``-separated relative path in UTF-8. The length framing makes the encoding injective:
moving bytes from one file into the next changes the digest.

Not measured, and said so in docs/serving.md: the Python interpreter, third-party packages
(numpy, onnxruntime, cryptography, Pillow, pyseccomp), and ``.pyc`` caches (Python may run a
cached ``.pyc`` instead of re-reading the source). Under Gramine all of those are trusted
files and enter MRENCLAVE; under ``sim`` nothing protects them from whoever owns the files.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "MEASUREMENT_TAG",
    "MEASURED_EXTRA_FILES",
    "check_loaded_modules",
    "measured_files",
    "package_dir",
    "sim_measurement",
]

MEASUREMENT_TAG = b"infenclave/sim-measurement/v1\n"

#: Project files outside ``enclave/`` that the enclave program imports (relative paths).
MEASURED_EXTRA_FILES: tuple[str, ...] = (
    "__init__.py",
    "attest/sim_format.py",
    "crypto.py",
    "errors.py",
    "measurement.py",
)

#: A source file of the enclave is a few tens of KiB; refuse something that is clearly not one.
_MAX_FILE_BYTES = 4 * 1024 * 1024


def package_dir() -> Path:
    """The directory of the installed ``infenclave`` package (the one that runs)."""
    return Path(__file__).resolve().parent


def measured_files(root: Path | None = None) -> list[str]:
    """Sorted relative paths (``/``-separated) of the files the measurement covers."""
    root = package_dir() if root is None else Path(root)
    enclave_dir = root / "enclave"
    names = {
        path.relative_to(root).as_posix()
        for path in enclave_dir.rglob("*.py")
        if "__pycache__" not in path.parts
    }
    names.update(MEASURED_EXTRA_FILES)
    return sorted(names)


def sim_measurement(root: Path | None = None) -> bytes:
    """Return the 32-byte ``sim`` measurement of the enclave program under *root*.

    *root* defaults to the installed package. A missing file is an error (`FileNotFoundError`),
    never skipped: skipping would measure a different program than the one named.
    """
    root = package_dir() if root is None else Path(root)
    digest = hashlib.sha256(MEASUREMENT_TAG)
    for rel in measured_files(root):
        content = _read(root / rel)
        path = rel.encode("utf-8")
        digest.update(struct.pack(">I", len(path)) + path)
        digest.update(struct.pack(">Q", len(content)) + content)
    return digest.digest()


def check_loaded_modules(
    modules: Iterable[tuple[str, str | None]] | None = None, root: Path | None = None
) -> list[str]:
    """Return the ``infenclave`` modules loaded from a file the measurement does not cover.

    *modules* is ``(name, file)`` pairs, by default every module in ``sys.modules``. An empty
    list means the measurement covers every loaded project module.
    """
    root = package_dir() if root is None else Path(root)
    covered = set(measured_files(root))
    if modules is None:
        modules = [(name, getattr(mod, "__file__", None)) for name, mod in list(sys.modules.items())]
    outside = []
    for name, file in modules:
        if name != "infenclave" and not name.startswith("infenclave."):
            continue
        if file is None:
            # A namespace placeholder (see enclave/__main__.py) has no code of its own.
            continue
        try:
            rel = Path(file).resolve().relative_to(root).as_posix()
        except ValueError:
            outside.append(name)
            continue
        if rel not in covered:
            outside.append(name)
    return sorted(outside)


def _read(path: Path) -> bytes:
    with open(path, "rb") as handle:
        data = handle.read(_MAX_FILE_BYTES + 1)
    if len(data) > _MAX_FILE_BYTES:
        raise ValueError(f"{path} is larger than {_MAX_FILE_BYTES} bytes: not an enclave source file")
    return data
