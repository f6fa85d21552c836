"""The Gramine manifest, rendered as the Makefile renders it, against Gramine 1.8-1.9's rules.

No Gramine here, so the rules this project relies on are written down as checks, each with
the Gramine source it comes from (gramineproject/gramine, v1.8/v1.9):

G1  ``loader.entrypoint`` is not written in the template. Since 1.8 gramine-manifest fills
    it in as a table ``{uri, sha256}`` (LibOS ``libsysdb.so``) and appends the LibOS to
    ``sgx.trusted_files`` (PR #1716 "Hide loader.entrypoint", PR #1820 "Validate entrypoint
    ELF file separately"); the string form was deprecated in 1.8 and dropped in 1.9 (PR #2054
    "Drop deprecated syntax of loader.entrypoint").
G2  The rendered manifest validates against ``GramineManifestSchema``
    (``python/graminelibos/manifest_check.py``): only known keys, with the right types, and
    ``fs.mounts``, ``libos.entrypoint``, ``loader.entrypoint.uri`` present. gramine-manifest
    runs that check by default and, from 1.8, fails on it
    (``Documentation/manpages/gramine-manifest.rst``, ``--check``). So no ``sgx.thread_num``
    (renamed ``sgx.max_threads`` in 1.6), no ``sgx.require_*`` or ``sgx.nonpie_binary``, no
    ``fs.mount.<name>`` tables, no ``loader.preload``.
G3  A mount's ``path`` is absolute; ``type`` is chroot (default), tmpfs, encrypted or
    untrusted_shm; a chroot mount has a ``file:`` URI (``Documentation/manifest-syntax.rst``,
    "FS mount points"; ``manifest_check.py`` ``_fs_base``).
G4  A trusted-file URI that names a directory ends with ``/`` and one that names a file does
    not; every entry must exist when gramine-sgx-sign hashes it
    (``python/graminelibos/manifest.py``, ``TrustedFile.expand_directory``/``ensure_hash``).
G5  ``sgx.enclave_size`` is a power of two (SECS.SIZE, Intel SDM vol. 3D 34.7; refused by
    the Linux SGX driver's ECREATE check otherwise) written with a K/M/G suffix
    (``sgx_sign.py`` ``parse_size``).
G6  ``sgx.max_threads`` thread slots are all the enclave has (``sgx_sign.py``
    ``get_memory_areas``: one TCS/SSA/stack per slot, fixed at signing): the program's
    threads plus Gramine's helpers must fit.
G7  Exactly one way of passing arguments: ``loader.argv`` (``manifest-syntax.rst``,
    "Command-line arguments"); environment entries are strings or ``{value}`` /
    ``{passthrough = true}`` tables (``manifest_check.py``).

Project rules on top (security and reproducibility): production enclave, DCAP, no
``insecure__`` option and no passthrough, no trusted file twice (by URI or by real file), no
mount that no trusted file or allowed file uses, no ``/state`` mount, ``argv[0]`` the
entrypoint, and ``--threads`` in ``loader.argv`` equal to the Makefile's ENCLAVE_THREADS.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import jinja2
import pytest

ROOT = Path(__file__).resolve().parents[1]
GRAMINE_DIR = ROOT / "deploy" / "gramine"
TEMPLATE = GRAMINE_DIR / "infenclave-enclave.manifest.template"
#: Stand-ins for what gramine-manifest provides (``gen_jinja_env.add_globals_from_gramine``),
#: at the paths of Gramine's Debian/Ubuntu package.
GRAMINE_PKGLIBDIR = "/usr/lib/x86_64-linux-gnu/gramine"


def load_trusted_files_module():
    spec = importlib.util.spec_from_file_location("trusted_files", GRAMINE_DIR / "trusted_files.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["trusted_files"] = module
    spec.loader.exec_module(module)
    return module


def makefile_defines(**overrides: str) -> dict[str, str]:
    """The -D variables the Makefile passes to gramine-manifest (``make -n``, nothing run but
    its ``$(shell ...)`` fact-finding)."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    args = [f"ARCH_LIBDIR=lib/{multiarch}", f"VENV={Path(sys.prefix)}", *(f"{k}={v}" for k, v in overrides.items())]
    out = subprocess.run(
        ["make", "-n", "-s", "-C", str(GRAMINE_DIR), "infenclave-enclave.manifest", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    command = out[out.index("gramine-manifest") :]
    command = command.replace("\\\n", " ").split(">")[0]
    defines: dict[str, str] = {}
    for token in shlex.split(command):
        if token.startswith("-D"):
            key, _, value = token[2:].partition("=")
            if value.startswith("$("):  # a command substitution the recipe's shell runs
                value = subprocess.run(
                    ["bash", "-c", f"echo {value}"],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=60,
                    cwd=GRAMINE_DIR,
                ).stdout.strip()
            defines[key] = value
    return defines


class _Runtimedir:
    def __call__(self, libc: str = "glibc") -> str:
        return f"{GRAMINE_PKGLIBDIR}/runtime/{libc}"

    def __str__(self) -> str:
        return self()


def render(trusted_fragment: str, defines: dict[str, str]) -> str:
    """Render like gramine-manifest: StrictUndefined Jinja2 over template + trusted list."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.globals["gramine"] = {"libos": f"{GRAMINE_PKGLIBDIR}/libsysdb.so", "runtimedir": _Runtimedir()}
    source = TEMPLATE.read_text() + trusted_fragment
    return env.from_string(source).render(**defines)


def as_gramine_manifest_fills_it(manifest: dict) -> dict:
    """G1: what gramine-manifest (>= 1.8) adds: loader.entrypoint as a table, LibOS trusted."""
    libos = f"file:{GRAMINE_PKGLIBDIR}/libsysdb.so"
    manifest.setdefault("loader", {}).setdefault("entrypoint", {"uri": libos})
    manifest["sgx"]["trusted_files"] = [libos, *manifest["sgx"]["trusted_files"]]
    return manifest


# --- G2: GramineManifestSchema (manifest_check.py), as key -> type --------------------------

_SIZE = str
_SCHEMA: dict[str, dict[str, object]] = {
    "fs": {"mounts": list, "root": dict, "start_dir": str, "insecure__keys": dict},
    "libos": {"entrypoint": str, "check_invalid_pointers": bool},
    "loader": {
        "entrypoint": dict,
        "argv": list,
        "argv_src_file": str,
        "env": dict,
        "env_src_file": str,
        "gid": int,
        "insecure__use_cmdline_argv": bool,
        "insecure__use_host_env": bool,
        "insecure__disable_aslr": bool,
        "log_file": str,
        "log_level": str,
        "uid": int,
    },
    "sgx": {
        "allowed_files": list,
        "cpu_features": dict,
        "debug": bool,
        "edmm_enable": bool,
        "enable_stats": bool,
        "enclave_size": _SIZE,
        "file_check_policy": str,
        "insecure__allow_memfaults_without_exinfo": bool,
        "insecure__rpc_thread_num": int,
        "isvprodid": int,
        "isvsvn": int,
        "max_threads": int,
        "preheat_enclave": bool,
        "profile": dict,
        "ra_client_linkable": bool,
        "ra_client_spid": str,
        "remote_attestation": str,
        "seal_key": dict,
        "trusted_files": list,
        "use_exinfo": bool,
        "vtune_profile": bool,
        "trusted_files_cache_size": _SIZE,
    },
    "sys": {
        "allowed_ioctls": list,
        "brk": dict,
        "disallow_subprocesses": bool,
        "enable_extra_runtime_domain_names_conf": bool,
        "enable_sigterm_injection": bool,
        "experimental__enable_flock": bool,
        "insecure__allow_eventfd": bool,
        "ioctl_structs": dict,
        "debug__mock_syscalls": list,
        "stack": dict,
        "fds": dict,
    },
}
_REQUIRED = (("fs", "mounts"), ("libos", "entrypoint"), ("loader", "entrypoint"))
_LOG_LEVELS = {"none", "error", "warning", "debug", "trace", "all"}
_MOUNT_TYPES = {"chroot", "encrypted", "tmpfs", "untrusted_shm"}


def schema_errors(manifest: dict) -> list[str]:
    """G2/G3/G7: every way *manifest* breaks GramineManifestSchema (empty: it validates)."""
    errors = []
    for section, value in manifest.items():
        if section not in _SCHEMA or not isinstance(value, dict):
            errors.append(f"unknown top-level key {section!r}")
            continue
        for key, item in value.items():
            expected = _SCHEMA[section].get(key)
            if expected is None:
                errors.append(f"unknown key {section}.{key}")
            elif not isinstance(item, expected) or (expected is int and isinstance(item, bool)):
                errors.append(f"{section}.{key} is {type(item).__name__}, not {expected.__name__}")  # type: ignore[union-attr]
    for section, key in _REQUIRED:
        if key not in manifest.get(section, {}):
            errors.append(f"missing required {section}.{key}")
    entry = manifest.get("loader", {}).get("entrypoint")
    if isinstance(entry, dict) and (set(entry) - {"uri", "sha256"} or "uri" not in entry):
        errors.append("loader.entrypoint must be {uri, sha256}")
    if manifest.get("loader", {}).get("log_level", "error") not in _LOG_LEVELS:
        errors.append("bad loader.log_level")
    for name, env in manifest.get("loader", {}).get("env", {}).items():
        if not (
            isinstance(env, str)
            or env in ({"passthrough": True},)
            or (isinstance(env, dict) and set(env) == {"value"} and isinstance(env["value"], str))
        ):
            errors.append(f"loader.env.{name} is neither a string, {{value}} nor {{passthrough = true}}")
    for mount in manifest.get("fs", {}).get("mounts", []):
        kind = mount.get("type", "chroot")
        if kind not in _MOUNT_TYPES or "path" not in mount:
            errors.append(f"bad mount {mount}")
        elif not mount["path"].startswith("/"):
            errors.append(f"mount path not absolute: {mount['path']}")
        elif kind != "tmpfs" and not str(mount.get("uri", "")).startswith("file:"):
            errors.append(f"mount without a file: URI: {mount}")
    if manifest.get("sgx", {}).get("remote_attestation", "none") not in {"none", "dcap", "epid"}:
        errors.append("bad sgx.remote_attestation")
    for entry in manifest.get("sgx", {}).get("trusted_files", []):
        if not (isinstance(entry, str) or (isinstance(entry, dict) and "uri" in entry)):
            errors.append(f"bad trusted file entry {entry!r}")
    ways = [k for k in ("argv", "argv_src_file", "insecure__use_cmdline_argv") if k in manifest.get("loader", {})]
    if len(ways) > 1:
        errors.append(f"more than one way of passing arguments: {ways}")
    return errors


def parse_size(value: str) -> int:
    """``sgx_sign.parse_size``: a number with an optional K/M/G suffix."""
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(value[-1:], 1)
    return int(value[:-1] if scale != 1 else value, 0) * scale


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trusted_module():
    return load_trusted_files_module()


@pytest.fixture(scope="module")
def defines() -> dict[str, str]:
    return makefile_defines()


@pytest.fixture(scope="module")
def trusted_fragment(trusted_module) -> str:
    layout = trusted_module.Layout(ROOT / "src")
    return trusted_module.render(trusted_module.collect(layout))


@pytest.fixture(scope="module")
def rendered(trusted_fragment, defines) -> str:
    return render(trusted_fragment, defines)


@pytest.fixture(scope="module")
def manifest(rendered) -> dict:
    return as_gramine_manifest_fills_it(tomllib.loads(rendered))


# --- tests ------------------------------------------------------------------------------------


def test_template_leaves_loader_entrypoint_to_gramine_manifest(rendered) -> None:
    """G1: a `loader.entrypoint` string is an error in Gramine 1.9."""
    assert "entrypoint" not in tomllib.loads(rendered).get("loader", {})
    assert re.search(r"^\s*loader\.entrypoint\s*=", TEMPLATE.read_text(), re.M) is None


def test_rendered_manifest_validates_against_gramine_schema(manifest) -> None:
    assert schema_errors(manifest) == []


def test_schema_check_catches_pre_1_8_syntax(manifest) -> None:
    """The checker above is not vacuous: the old template's constructs fail it."""
    old = {**manifest, "loader": {**manifest["loader"], "entrypoint": "file:/x/libsysdb.so"}}
    old["sgx"] = {**manifest["sgx"], "thread_num": 16, "nonpie_binary": True}
    old["fs"] = {**manifest["fs"], "mount": {"lib": {"type": "chroot"}}}
    errors = schema_errors(old)
    assert any("sgx.thread_num" in e for e in errors)
    assert any("sgx.nonpie_binary" in e for e in errors)
    assert any("fs.mount" in e for e in errors)
    assert any("loader.entrypoint" in e for e in errors)
    relative = {**manifest, "fs": {"mounts": [{"path": "bundles", "uri": "file:bundles"}]}}
    assert any("not absolute" in e for e in schema_errors(relative))


def test_trusted_files_exist_once_and_are_well_formed(manifest, trusted_module) -> None:
    """G4 and no file hashed twice: by URI, by real file, or through a listed directory."""
    uris = [e if isinstance(e, str) else e["uri"] for e in manifest["sgx"]["trusted_files"]]
    assert len(uris) == len(set(uris)), "a trusted URI is listed twice"
    host = [u[len("file:") :] for u in uris if not u.startswith(f"file:{GRAMINE_PKGLIBDIR}")]
    directories = [p for p in host if p.endswith("/")]
    assert directories == [], f"host directories listed whole: {directories}"
    for path in host:
        assert Path(path).is_file(), f"trusted file missing here: {path}"
    real = [os.path.realpath(p) for p in host]
    twice = {r for r in real if real.count(r) > 1}
    assert not twice, f"one file under two names: {sorted(twice)[:5]}"
    assert not any("/__pycache__/" in p or p.endswith(".pyc") for p in host)
    assert not any(
        "/site-packages/" in p and "/lib/python3" in p and p.startswith(sys.base_prefix)
        for p in host
        if sys.base_prefix != sys.prefix
    ), "base site-packages listed"
    # Gramine's own glibc comes from its runtime directory, never from the host.
    assert not any(Path(p).name in trusted_module.GRAMINE_GLIBC_LIBS for p in host)
    assert f"file:{GRAMINE_PKGLIBDIR}/runtime/glibc/" in uris


def test_no_glibc_newer_than_gramines(manifest, trusted_module) -> None:
    uris = [e if isinstance(e, str) else e["uri"] for e in manifest["sgx"]["trusted_files"]]
    host = [Path(u[len("file:") :]) for u in uris if not u.startswith(f"file:{GRAMINE_PKGLIBDIR}")]
    newest = trusted_module.needed_glibc(host)
    assert newest > (2, 0), "readelf found no GLIBC_ version needs: the check did not run"
    assert newest <= trusted_module.GRAMINE_GLIBC, newest


def test_mounts_are_used_once_and_cover_every_trusted_file(manifest) -> None:
    mounts = manifest["fs"]["mounts"]
    paths = [m["path"] for m in mounts]
    assert len(paths) == len(set(paths)), "a mount path twice"
    assert "/state" not in paths, "the enclave writes no state of its own"
    uris = [e if isinstance(e, str) else e["uri"] for e in manifest["sgx"]["trusted_files"]]
    allowed = manifest["sgx"]["allowed_files"]
    host_mounts = [m for m in mounts if m.get("type", "chroot") == "chroot"]
    for mount in host_mounts:
        root = mount["uri"].rstrip("/") + "/"
        used = any(u.startswith(root) or u + "/" == root for u in uris + allowed)
        assert used, f"mount {mount['path']} holds no trusted or allowed file"
        others = [o for o in host_mounts if o is not mount]
        assert not any(
            root.startswith(o["uri"].rstrip("/") + "/")
            and mount["path"].startswith(o["path"].rstrip("/") + "/")
            and mount["path"][len(o["path"]) :] == mount["uri"][len(o["uri"]) :]
            for o in others
        ), f"mount {mount['path']} repeats a mount above it"
    for uri in uris:
        path = uri[len("file:") :]
        assert any(path.startswith(m["uri"][len("file:") :].rstrip("/") + "/") for m in host_mounts), (
            f"trusted file outside every mount: {path}"
        )


def test_security_choices(manifest) -> None:
    loader, sgx = manifest["loader"], manifest["sgx"]
    assert sgx["debug"] is False and sgx["remote_attestation"] == "dcap"
    assert loader["log_level"] == "error"
    flat = repr(manifest)
    assert "insecure__" not in flat and "passthrough" not in flat
    assert loader["argv"][0] == manifest["libos"]["entrypoint"]
    assert loader["argv"][1:6] == ["-B", "-S", "-P", "-m", "infenclave.enclave"]
    assert f"file:{manifest['libos']['entrypoint']}" in sgx["trusted_files"]
    assert manifest["sys"]["disallow_subprocesses"] is True
    assert sgx["allowed_files"] == ["file:bundles/"]
    assert loader["env"]["LD_LIBRARY_PATH"].split(":")[0] == "/lib"
    lib_mount = next(m for m in manifest["fs"]["mounts"] if m["path"] == "/lib")
    assert lib_mount["uri"] == f"file:{GRAMINE_PKGLIBDIR}/runtime/glibc"


def test_size_and_threads_fit(manifest, defines, trusted_module) -> None:
    """G5, G6: a power-of-two enclave, and threads that fit the fixed slots."""
    sgx = manifest["sgx"]
    size = parse_size(sgx["enclave_size"])
    assert size & (size - 1) == 0 and size >= 2**30, sgx["enclave_size"]
    argv = manifest["loader"]["argv"]
    threads = int(argv[argv.index("--threads") + 1])
    assert threads == int(defines["enclave_threads"])
    assert trusted_module.threads_needed(threads) <= sgx["max_threads"]
    assert sgx["edmm_enable"] is False  # the sizing in README.md assumes no EDMM


def test_makefile_refuses_threads_that_do_not_fit() -> None:
    script = GRAMINE_DIR / "trusted_files.py"
    ok = subprocess.run(
        [sys.executable, str(script), "--check-threads", "2", "8"], capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0, ok.stderr
    for threads, max_threads in (("4", "8"), ("0", "64")):
        refused = subprocess.run(
            [sys.executable, str(script), "--check-threads", threads, max_threads],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 1 and "refusing" in refused.stderr
