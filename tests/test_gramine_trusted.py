"""Every file the enclave program loads lies in the Gramine manifest's trusted list.

Gramine refuses to open a file under a mount that is neither a trusted nor an allowed file
(``sgx.file_check_policy = "strict"``, the default), so a module the enclave imports but the
list misses would make the enclave fail on SGX only. No SGX here: instead the manifest is
rendered on this machine (`test_gramine_manifest.render`, the Makefile's variables and
trusted_files.py), and the real enclave program is run as Gramine would run it — the
manifest's interpreter, ``loader.argv`` flags (``-B -S -P``) and ``loader.env`` — through a
whole request (HELLO, LOAD, PROVISION, REQUEST/IR1, IR2/RESULT). At exit the probe reports
``sys.modules`` and every file mapped in ``/proc/self/maps``; each must be a trusted file.

Differences from SGX, on purpose and listed: ``--tee sim`` instead of ``gramine-sgx`` (no
``/dev/attestation`` here; both take the same code path apart from the evidence and sealing
classes, which live in the same modules), so the ``sim`` sandbox's pyseccomp and libseccomp
load here and are excluded by name; host glibc libraries stand in for Gramine's own (same
names, served from ``gramine.runtimedir()`` in the enclave).

The same run measures what the sizing in deploy/gramine/README.md rests on: peak resident
memory and the number of threads while serving with ``--threads 2``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tomllib
from pathlib import Path

import numpy as np
import pytest

from infenclave.bundle import read_backnet, read_key_file, read_manifest
from infenclave.crypto import generate_keypair, open_sealed, seal
from infenclave.protocol.frames import FrameReader, MsgType, encode_frame, tensor_from_frame, tensors_meta, write_frame
from infenclave.protocol.messages import encode_request, provision_context, request_context, response_context
from test_gramine_manifest import (
    GRAMINE_PKGLIBDIR,
    ROOT,
    as_gramine_manifest_fills_it,
    load_trusted_files_module,
    makefile_defines,
    render,
)
from test_serving_support import make_bundle

MODEL = "efficientnet-lite0"
PROBE_THREADS = 2

#: Loaded only under ``--tee sim`` (the process sandbox), never inside Gramine.
SIM_ONLY = ("/pyseccomp", "libseccomp")

_PROBE = r"""
import atexit, json, os, runpy, sys
# Opened before the sim sandbox's Landlock rules (read-only trees, no /proc): kept as fds.
_report = os.open(os.environ.pop("INFENCLAVE_PROBE_REPORT"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
_maps = os.open("/proc/self/maps", os.O_RDONLY)
_status = os.open("/proc/self/status", os.O_RDONLY)
# The sim sandbox grants reading sys.prefix; the manifest's interpreter is the base one with
# the venv's site-packages on PYTHONPATH, so name that venv (Gramine has no such sandbox).
for _entry in os.environ.get("PYTHONPATH", "").split(":"):
    if _entry.endswith("site-packages"):
        sys.prefix = os.path.dirname(os.path.dirname(os.path.dirname(_entry)))
def _read(fd):
    os.lseek(fd, 0, 0)
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks).decode()
def _dump():
    files = sorted({str(getattr(m, "__file__", "") or "") for m in list(sys.modules.values())} - {""})
    mapped = set()
    for line in _read(_maps).splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("/"):
            mapped.add(parts[5].strip())
    status = dict(line.split(":", 1) for line in _read(_status).splitlines() if ":" in line)
    os.write(_report, json.dumps({"modules": files, "mapped": sorted(mapped),
                                  "vm_hwm_kb": int(status["VmHWM"].split()[0])}).encode())
atexit.register(_dump)
sys.argv[0] = "infenclave.enclave"
runpy.run_module("infenclave.enclave", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def gramine_manifest() -> dict:
    trusted = load_trusted_files_module()
    fragment = trusted.render(trusted.collect(trusted.Layout(ROOT / "src")))
    defines = makefile_defines(ENCLAVE_THREADS=str(PROBE_THREADS))
    return as_gramine_manifest_fills_it(tomllib.loads(render(fragment, defines)))


def _probe_command(manifest: dict, bundles: Path, state: Path) -> list[str]:
    """The manifest's loader.argv, with the sim backend and this machine's folders."""
    argv = list(manifest["loader"]["argv"])
    assert argv[0] == manifest["libos"]["entrypoint"]
    flags, program = argv[1:4], argv[4:]
    assert flags == ["-B", "-S", "-P"] and program[:2] == ["-m", "infenclave.enclave"]
    args = program[2:]
    args[args.index("--tee") + 1] = "sim"
    args[args.index("--bundles") + 1] = str(bundles)
    return [argv[0], *flags, "-c", _PROBE, *args, "--state", str(state)]


def serve_one_request(process: subprocess.Popen, parent: socket.socket, bundle) -> int:
    """Drive a started enclave through HELLO, LOAD, PROVISION, REQUEST/IR1 and IR2/RESULT as
    an honest host would; close the channel and wait for it to exit. Returns its thread count
    while serving. Every frame must parse: a stray byte on the channel fails here."""
    reader = FrameReader(parent.fileno())
    tag = 0

    def call(msg: MsgType, meta: dict | None = None, body: bytes | memoryview = b"", at: int | None = None):
        nonlocal tag
        tag = tag + 1 if at is None else tag
        write_frame(parent.fileno(), encode_frame(msg, at or tag, meta, body))
        frame = reader.read()
        assert frame is not None, "the enclave closed the channel"
        return frame

    try:
        hello = reader.read()
        assert hello is not None and hello.type == MsgType.HELLO
        public_key = bytes.fromhex(hello.meta["public_key"])
        assert call(MsgType.LOAD, {"bundle": bundle.bundle.name}).type == MsgType.LOADED
        key = read_key_file(bundle.key)
        provisioned = call(MsgType.PROVISION, body=seal(public_key, key.key, context=provision_context(key.model_id)))
        assert provisioned.type == MsgType.PROVISIONED
        from infenclave.host.backnet import BackNet
        from infenclave.sample_images import builtin_images

        backnet = BackNet(read_backnet(bundle.bundle, read_manifest(bundle.bundle)))
        request_id = os.urandom(16).hex()
        reply_private, reply_public = generate_keypair()
        image = builtin_images()["chelsea"].read_bytes()
        sealed = seal(
            public_key, encode_request(image, reply_public, 5), context=request_context(key.model_id, request_id)
        )
        ir1 = call(MsgType.REQUEST, {"request_id": request_id}, sealed)
        assert ir1.type == MsgType.IR1
        with open(f"/proc/{process.pid}/status") as handle:
            threads = int(next(line for line in handle if line.startswith("Threads:")).split()[1])
        outputs = backnet(tensor_from_frame(ir1))  # [IR2, *what the enclave checks it with]
        body = b"".join(memoryview(np.ascontiguousarray(y, dtype=np.float32)).cast("B") for y in outputs)
        result = call(MsgType.IR2, tensors_meta(outputs), body, at=ir1.tag)
        assert result.type == MsgType.RESULT
        answer = json.loads(
            open_sealed(reply_private, bytes(result.body), context=response_context(key.model_id, request_id))
        )
        assert len(answer["predictions"]) == 5
    finally:
        parent.close()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return threads


@pytest.fixture(scope="module")
def probe_run(gramine_manifest, tmp_path_factory) -> dict:
    bundle = make_bundle(MODEL)
    work = tmp_path_factory.mktemp("gramine-probe")
    report = work / "report.json"
    env = dict(gramine_manifest["loader"]["env"], INFENCLAVE_PROBE_REPORT=str(report))
    parent, child = socket.socketpair()
    process = subprocess.Popen(
        _probe_command(gramine_manifest, bundle.bundle.parent, work),
        stdin=child,
        stdout=child,
        stderr=subprocess.PIPE,
        env=env,
        cwd=work,
    )
    child.close()
    threads = serve_one_request(process, parent, bundle)
    assert process.returncode == 0, process.stderr.read().decode() if process.stderr else ""
    data = json.loads(report.read_text())
    data["threads"] = threads
    return data


def test_every_loaded_file_is_trusted(gramine_manifest, probe_run) -> None:
    trusted_module = load_trusted_files_module()
    uris = [e if isinstance(e, str) else e["uri"] for e in gramine_manifest["sgx"]["trusted_files"]]
    trusted = {os.path.realpath(u[len("file:") :]) for u in uris if not u.startswith(f"file:{GRAMINE_PKGLIBDIR}")}
    loaded = [p for p in probe_run["modules"] + probe_run["mapped"] if os.path.isfile(p)]
    assert any("onnxruntime_pybind11_state" in p for p in loaded), "the probe did not run ORT"
    assert any(p.endswith("infenclave/enclave/program.py") for p in loaded)
    outside = sorted(
        {
            p
            for p in loaded
            if os.path.realpath(p) not in trusted
            and Path(p).name not in trusted_module.GRAMINE_GLIBC_LIBS  # Gramine's glibc instead
            and not any(marker in p for marker in SIM_ONLY)
        }
    )
    assert outside == [], f"loaded but not trusted: {outside}"


def test_probe_fits_the_stated_sizing(gramine_manifest, probe_run, trusted_module=None) -> None:
    """Threads with --threads 2 fit the formula the Makefile checks; memory fits the enclave."""
    trusted_module = load_trusted_files_module()
    app_threads = 1 + 2 * (PROBE_THREADS - 1)
    assert probe_run["threads"] <= app_threads, probe_run["threads"]
    assert trusted_module.threads_needed(PROBE_THREADS) <= gramine_manifest["sgx"]["max_threads"]
    size = gramine_manifest["sgx"]["enclave_size"]
    enclave_bytes = int(size[:-1]) * {"K": 2**10, "M": 2**20, "G": 2**30}[size[-1]]
    # Inside SGX a mapped library occupies its whole size in enclave memory: add them all.
    mapped_bytes = sum(os.path.getsize(p) for p in probe_run["mapped"] if os.path.isfile(p))
    need = probe_run["vm_hwm_kb"] * 1024 + mapped_bytes
    print(
        f"probe: {probe_run['threads']} threads, VmHWM {probe_run['vm_hwm_kb'] / 1024:.0f} MiB, "
        f"mapped files {mapped_bytes / 2**20:.0f} MiB, enclave {size}"
    )
    assert need * 2 <= enclave_bytes, f"{need / 2**20:.0f} MiB needs more than half of {size}"


def test_serves_with_stdout_and_stderr_aliased_to_the_channel(tmp_path) -> None:
    """Gramine gives the enclave one host handle for fds 1 and 2: the channel. The real enclave
    program, started with fds 0, 1 and 2 all on the channel socket, must serve a whole request
    with every frame intact: nothing it (or numpy, onnxruntime, Python's warnings) writes to
    stdout or stderr may reach the socket. Before the program moved the channel to fds of its
    own, its start-up log line alone broke the first frame here."""
    import sys

    bundle = make_bundle(MODEL)
    parent, child = socket.socketpair()
    env = dict(os.environ, PYTHONWARNINGS="always")  # warnings are output too: none may leak
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "infenclave.enclave",
            "--tee",
            "sim",
            "--channel",
            "stdio",
            "--bundles",
            str(bundle.bundle.parent),
            "--state",
            str(tmp_path),
            "--threads",
            "1",
        ],
        stdin=child,
        stdout=child,
        stderr=child,
        env=env,
    )
    child.close()
    serve_one_request(process, parent, bundle)
    assert process.returncode == 0
