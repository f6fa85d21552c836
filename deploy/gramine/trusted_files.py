"""List exactly the files the enclave program loads, as Gramine trusted files.

Run with the interpreter the enclave will run (the venv's ``bin/python``), from the Makefile:

    python trusted_files.py --src ../../src > trusted-files.toml      # TOML fragment
    python trusted_files.py --src ../../src --summary                  # counts, sizes, glibc

Why a generator and not directories in the template: a directory entry hashes everything in
it, and the obvious directories are far too wide. ``/lib/x86_64-linux-gnu/`` and
``/usr/lib/x86_64-linux-gnu/`` are the same directory on a merged-/usr system (about 3,100
files, hashed twice), and a pyenv or uv interpreter keeps its own ``site-packages`` inside the
standard-library directory (tens of thousands of files): any ``apt`` or ``pip`` change would
then move MRENCLAVE. What is listed instead, each file once by its canonical path:

1. the interpreter and ``libpython`` (when shared);
2. the standard library's files, without ``site-packages``/``dist-packages``, bytecode
   caches and the parts that cannot run in the enclave (`STDLIB_EXCLUDED`);
3. ``lib-dynload`` extension modules, without those for terminals, GUIs and databases
   (`DYNLOAD_EXCLUDED`);
4. the files of the third-party packages the enclave imports (`PACKAGES`), without bytecode
   caches, test suites and onnxruntime's offline tooling (`PACKAGE_EXCLUDED`);
5. the ``ldd`` closure of 1, 3 and 4, without the libraries Gramine's own glibc provides
   (`GRAMINE_GLIBC_LIBS`: they are loaded from ``{{ gramine.runtimedir() }}``, which is
   listed as a directory: Gramine's install, not the host's);
6. the project modules of the trusted computing base (`PROJECT_FILES`).

Bytecode (``__pycache__``) is never listed: ``.pyc`` files are not reproducible (they embed
source mtimes, and marshal output can differ between runs), and the enclave runs with
``-B``; Python compiles the trusted sources instead (the price is start-up time, see the
README's sizing section).

A test (``tests/test_gramine_trusted.py``) renders this list on the development machine and
checks that every file a probe run of the enclave program loads is covered.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

#: Gramine 1.8/1.9 build glibc 2.40 for the enclave (``subprojects/glibc-2.40-1.wrap`` and
#: ``subprojects/packagefiles/glibc-2.40/meson.build`` in gramineproject/gramine). A library
#: that needs a newer ``GLIBC_x.y`` symbol version does not load inside the enclave.
GRAMINE_GLIBC = (2, 40)

#: What Gramine installs into ``runtime/glibc`` (``glibc_output_paths`` in
#: ``subprojects/packagefiles/glibc-2.40/meson.build``): inside the enclave ``/lib`` is that
#: directory and comes first on ``LD_LIBRARY_PATH``, so the host's copies are never loaded.
GRAMINE_GLIBC_LIBS = frozenset({
    "ld-linux-x86-64.so.2", "ld.so", "libc.so.6", "libdl.so.2", "libm.so.6", "libmvec.so.1",
    "libnsl.so.1", "libnss_compat.so.2", "libnss_db.so.2", "libnss_dns.so.2",
    "libnss_files.so.2", "libpthread.so.0", "libresolv.so.2", "librt.so.1", "libanl.so.1",
    "libthread_db.so.1", "libutil.so.1",
})

#: Third-party packages the enclave imports, with the vendored shared libraries auditwheel put
#: beside them: numpy, onnxruntime, Pillow, cryptography (and its cffi backend), and onnx,
#: which `enclave.onnx_runner` uses to refuse non-data models, with what onnx imports
#: (protobuf and its upb extension, ml_dtypes, typing_extensions). Found by the probe run in
#: tests/test_gramine_trusted.py, not guessed.
PACKAGES = ("numpy", "numpy.libs", "onnxruntime", "PIL", "pillow.libs", "cryptography",
            "_cffi_backend", "onnx", "google/protobuf", "google/_upb", "ml_dtypes",
            "typing_extensions")

#: Standard-library parts that never run in the enclave (GUI, terminal, test suites, package
#: installers, 2to3, the build-time Makefile config) plus every third-party directory.
STDLIB_EXCLUDED = frozenset({
    "site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib", "tkinter",
    "turtledemo", "ensurepip", "lib2to3", "pydoc_data", "lib-dynload", "venv", "curses",
    "dbm", "sqlite3",
})
#: ``config-3.x-<triplet>`` holds libpython.a and the Makefile: build-time only.
_STDLIB_EXCLUDED_PREFIX = ("config-",)

#: ``lib-dynload`` modules for terminals, GUIs, databases, NIS/crypt, TLS (the enclave opens
#: no connection) and CPython's own tests.
DYNLOAD_EXCLUDED = re.compile(
    r"^(_tkinter|readline|_curses|_curses_panel|_sqlite3|_dbm|_gdbm|nis|_crypt|spwd|ossaudiodev|_ssl"
    r"|audioop|_test\w*|_ctypes_test|_xxtestfuzz|xx\w*)\."
)

#: Inside the listed packages: caches, test suites, and onnxruntime's offline tooling
#: (model conversion, quantization, transformer optimisers), which ``import onnxruntime``
#: never loads.
PACKAGE_EXCLUDED = frozenset({"__pycache__", "tests", "test", "testing"})
_ORT_EXCLUDED = frozenset({"transformers", "tools", "quantization", "datasets"})

#: The project's trusted computing base (DESIGN.md): the enclave program, the shared formats,
#: ``crypto`` and ``errors``. ``enclave/sandbox.py`` is listed with its package (it is only
#: imported under ``sim``).
PROJECT_FILES = ("infenclave/__init__.py", "infenclave/errors.py", "infenclave/crypto.py",
                 "infenclave/protocol/", "infenclave/enclave/")


def _files_under(root: Path, excluded: frozenset[str], suffixes: Iterable[str] | None = None) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in excluded and not d.startswith(_STDLIB_EXCLUDED_PREFIX))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if suffixes is not None and not name.endswith(tuple(suffixes)):
                continue
            if path.is_file():
                yield path


def canonical(path: Path | str) -> Path:
    """The path with its directory resolved (``/lib`` -> ``/usr/lib`` on merged /usr) but its
    file name kept (a SONAME link is what the dynamic loader opens)."""
    path = Path(path)
    return Path(os.path.realpath(path.parent)) / path.name


def is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == b"\x7fELF"
    except OSError:
        return False


def ldd_closure(binaries: Iterable[Path]) -> set[Path]:
    """Every shared library the binaries need (``ldd`` resolves the whole tree), canonical."""
    found: set[Path] = set()
    items = sorted({str(b) for b in binaries})
    for start in range(0, len(items), 200):
        out = subprocess.run(["ldd", *items[start:start + 200]], capture_output=True, text=True,
                             check=False).stdout
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[1] == "=>" and parts[2].startswith("/"):
                found.add(canonical(parts[2]))
            elif parts and parts[0].startswith("/") and not parts[0].endswith(":"):
                found.add(canonical(parts[0]))
    return found


class Layout:
    """Where the running interpreter, its standard library and the packages live."""

    def __init__(self, src_dir: Path, site_packages: Path | None = None) -> None:
        paths = sysconfig.get_paths()
        self.python_exe = Path(os.path.realpath(sys.executable))
        self.prefix = Path(sys.base_prefix)
        self.stdlib = Path(paths["stdlib"])
        self.dynload = Path(sysconfig.get_config_var("DESTSHARED") or self.stdlib / "lib-dynload")
        self.site_packages = Path(site_packages or paths["purelib"])
        self.src_dir = Path(src_dir).resolve()
        libdir = sysconfig.get_config_var("LIBDIR")
        ldlibrary = sysconfig.get_config_var("LDLIBRARY") or ""
        self.libpython = (Path(libdir) / ldlibrary if libdir and ldlibrary.endswith(".so")
                          else None)
        self.libpython_real = None
        if self.libpython is not None:
            # The SONAME (libpython3.x.so.1.0) is what the interpreter's loader opens.
            soname = sysconfig.get_config_var("INSTSONAME") or ldlibrary
            self.libpython = canonical(Path(libdir) / soname)


def collect(layout: Layout) -> list[Path]:
    """The trusted files, canonical, sorted, each once (see the module docstring)."""
    files: set[Path] = {layout.python_exe}
    if layout.libpython is not None and layout.libpython.exists():
        files.add(layout.libpython)
    files.update(canonical(p) for p in _files_under(layout.stdlib, STDLIB_EXCLUDED, (".py",)))
    files.update(canonical(p) for p in sorted(layout.dynload.glob("*.so"))
                 if DYNLOAD_EXCLUDED.match(p.name) is None)
    for name in PACKAGES:
        root = layout.site_packages / name
        if root.is_dir():
            excluded = PACKAGE_EXCLUDED | (_ORT_EXCLUDED if name == "onnxruntime" else frozenset())
            files.update(canonical(p) for p in _files_under(root, excluded))
        else:
            files.update(canonical(p) for p in layout.site_packages.glob(f"{name}.*.so"))
            files.update(canonical(p) for p in layout.site_packages.glob(f"{name}.py"))
    for entry in PROJECT_FILES:
        path = layout.src_dir / entry
        if entry.endswith("/"):
            files.update(canonical(p) for p in _files_under(path, PACKAGE_EXCLUDED, (".py",)))
        else:
            files.add(canonical(path))
    elves = [p for p in files if p.suffix == ".so" or ".so." in p.name or p == layout.python_exe]
    files.update(lib for lib in ldd_closure(elves) if lib.name not in GRAMINE_GLIBC_LIBS)
    return sorted(files)


def mount_dirs(layout: Layout, paths: Iterable[Path]) -> list[str]:
    """The fewest host directories to mount (each at its own path) so that every trusted file
    is visible: the interpreter's prefix, site-packages, src/, and the directories of the
    system libraries. A directory inside another mounted one is not mounted again."""
    roots = {layout.prefix.resolve(), layout.site_packages.resolve(), layout.src_dir}
    for path in paths:
        if not any(path.is_relative_to(root) for root in roots):
            roots.add(path.parent)
    kept = sorted(r for r in roots if not any(r != o and r.is_relative_to(o) for o in roots))
    return [str(r) for r in kept]


#: Threads Gramine itself may run inside the enclave beside the application's (LibOS IPC and
#: async helpers, Gramine 1.8/1.9 ``libos/src/ipc``, ``libos/src/libos_async.c``); a margin,
#: to be confirmed on the first SGX run (README.md, checklist).
GRAMINE_HELPER_THREADS = 4


def threads_needed(enclave_threads: int) -> int:
    """Enclave threads for ``--threads N``: the main thread, N - 1 pool threads for each of
    the two ONNX Runtime sessions (FrontNet, Tail; inter-op pools are 1, so none), and
    Gramine's helpers. N = 0 (one per core) is refused: the core count is the host's."""
    if enclave_threads < 1:
        raise ValueError("under SGX the ONNX Runtime thread count must be explicit (>= 1)")
    return 1 + 2 * (enclave_threads - 1) + GRAMINE_HELPER_THREADS


def needed_glibc(paths: Iterable[Path]) -> tuple[int, int]:
    """The newest ``GLIBC_x.y`` symbol version any of the ELF files needs (``readelf -V``)."""
    newest = (0, 0)
    elves = [str(p) for p in paths if is_elf(p)]
    for start in range(0, len(elves), 200):
        out = subprocess.run(["readelf", "-V", "--wide", *elves[start:start + 200]],
                             capture_output=True, text=True, check=False).stdout
        for major, minor in re.findall(r"Name: GLIBC_(\d+)\.(\d+)", out):
            newest = max(newest, (int(major), int(minor)))
    return newest


def render(paths: Iterable[Path]) -> str:
    """The TOML fragment the Makefile appends to the manifest template."""
    lines = [
        "# Generated by deploy/gramine/trusted_files.py: do not edit; rebuild with `make`.",
        "sgx.trusted_files = [",
        '  "file:{{ gramine.runtimedir() }}/",',
    ]
    for path in paths:
        text = str(path)
        if any(c in text for c in '"\\\n') or not text.isprintable():
            raise SystemExit(f"refusing a path TOML would need to escape: {text!r}")
        lines.append(f'  "file:{text}",')
    lines.append("]")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[2] / "src",
                        help="the project's src/ directory (default: this checkout's)")
    parser.add_argument("--site-packages", type=Path, default=None)
    parser.add_argument("--summary", action="store_true", help="counts, bytes and glibc need")
    parser.add_argument("--mount-dirs", action="store_true", help="host directories to mount")
    parser.add_argument("--check-threads", nargs=2, type=int, metavar=("THREADS", "MAX_THREADS"),
                        help="refuse a --threads value that does not fit sgx.max_threads")
    args = parser.parse_args(argv)
    if args.check_threads:
        threads, max_threads = args.check_threads
        try:
            needed = threads_needed(threads)
        except ValueError as exc:
            print(f"refusing: {exc}", file=sys.stderr)
            return 1
        if needed > max_threads:
            print(f"refusing: --threads {threads} needs {needed} enclave threads, "
                  f"sgx.max_threads is {max_threads}", file=sys.stderr)
            return 1
        return 0
    layout = Layout(args.src, args.site_packages)
    paths = collect(layout)
    if args.mount_dirs:
        print(" ".join(mount_dirs(layout, paths)))
        return 0
    newest = needed_glibc(paths)
    if newest > GRAMINE_GLIBC:
        print(f"refusing: these files need GLIBC_{newest[0]}.{newest[1]}, newer than Gramine's "
              f"{GRAMINE_GLIBC[0]}.{GRAMINE_GLIBC[1]}; build on an older distribution "
              "(see Dockerfile)", file=sys.stderr)
        return 1
    if args.summary:
        size = sum(p.stat().st_size for p in paths)
        print(f"{len(paths)} files, {size / 2**20:.1f} MiB, newest glibc symbol needed: "
              f"GLIBC_{newest[0]}.{newest[1]} (Gramine's: {GRAMINE_GLIBC[0]}.{GRAMINE_GLIBC[1]})")
        return 0
    sys.stdout.write(render(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
