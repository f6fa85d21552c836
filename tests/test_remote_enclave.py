"""Enclave workers over TCP: ``python -m infenclave.enclave --listen`` and ``serve --enclave``.

Real processes and sockets on 127.0.0.1. The sandbox test runs the real walls with a listening
socket made before them and checks that the enclave can accept on that socket and on nothing
else, and can neither create a socket nor connect. The serving test starts an enclave that
listens, a server with one local worker and that remote enclave, provisions once, and
classifies real photos through both: same frames, same evidence checks, same answers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from infenclave.host.enclave_pool import _enclave_env
from test_serving_support import free_port, make_bundle, plain_predictor, sim_client

MODEL = "efficientnet-lite0"

_PROBE = textwrap.dedent(
    r"""
    import ctypes, errno, json, os, socket, sys
    from pathlib import Path
    from infenclave.enclave.sandbox import apply_sandbox, prepare_environment
    prepare_environment()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    print(listener.getsockname()[1], flush=True)
    report = apply_sandbox(Path(sys.argv[1]), listen_fd=listener.fileno())
    libc = ctypes.CDLL(None, use_errno=True)
    results = {"allowed": [a for a in report.allowed_syscalls if a.startswith("accept")]}
    def attempt(name, fn):
        try:
            fn()
            results[name] = "ALLOWED"
        except OSError as exc:
            results[name] = errno.errorcode.get(exc.errno, str(exc.errno))
    attempt("socket_inet", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    attempt("socket_unix", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    attempt("socketpair", lambda: socket.socketpair())
    attempt("connect_listener", lambda: listener.connect(("127.0.0.1", 9)))
    other = os.dup(listener.fileno())
    rc = libc.accept4(other, None, None, 0)
    results["accept_other_fd"] = "ALLOWED" if rc >= 0 else errno.errorcode[ctypes.get_errno()]
    connection, _ = listener.accept()  # the one thing the network may still do
    os.write(connection.fileno(), json.dumps(results).encode())  # as the frames go: write(2)
    connection.close()
    """
)


@pytest.mark.skipif(os.geteuid() != 0 or sys.platform != "linux", reason="the sandbox's root path is tested")
def test_sandbox_allows_accept_on_the_listening_socket_only(tmp_path: Path) -> None:
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    probe = subprocess.Popen(
        [sys.executable, "-c", _PROBE, str(bundles)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_enclave_env(),
        cwd=tmp_path,
    )
    try:
        port = int(probe.stdout.readline())  # type: ignore[union-attr]
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.settimeout(60)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        assert probe.wait(60) == 0, probe.stderr.read().decode()  # type: ignore[union-attr]
    finally:
        if probe.poll() is None:
            probe.kill()
    results = json.loads(data)
    assert results["allowed"] and all(a.endswith(")") for a in results["allowed"])  # fd-bound rules
    for name in ("socket_inet", "socket_unix", "socketpair", "connect_listener", "accept_other_fd"):
        assert results[name] == "EPERM", (name, results)


def _wait_log(path: Path, text: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if process.poll() is not None:
            raise RuntimeError(path.read_text(errors="replace"))
        time.sleep(0.05)
    raise TimeoutError(path.read_text(errors="replace"))


def _stop(process: subprocess.Popen, sig: int = signal.SIGINT) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_classify_through_a_local_worker_and_a_remote_enclave(photos) -> None:
    bundle = make_bundle(MODEL)
    work = Path(tempfile.mkdtemp(prefix="infenclave-remote-"))
    state = work / "state"  # one installation: the remote enclave unseals what the local one sealed
    enclave_port, port = free_port(), free_port()
    enclave_log, log = work / "enclave.log", work / "serve.log"
    enclave = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "infenclave.enclave",
            "--tee",
            "sim",
            "--listen",
            f"127.0.0.1:{enclave_port}",
            "--bundles",
            str(bundle.bundle.parent),
            "--state",
            str(state),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(enclave_log, "wb"),
        env=_enclave_env(),
        cwd=work,
    )
    server = None
    try:
        _wait_log(enclave_log, "listening on", enclave)
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "infenclave.cli",
                "serve",
                str(bundle.bundle),
                "--port",
                str(port),
                "--workers",
                "1",
                "--enclave",
                f"127.0.0.1:{enclave_port}",
                "--state",
                str(state),
            ],
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        url = f"http://127.0.0.1:{port}"
        deadline, health = time.monotonic() + 120, {}
        while time.monotonic() < deadline and health.get("workers") != 2:
            assert server.poll() is None, log.read_text(errors="replace")
            try:
                health = httpx.get(url + "/healthz", timeout=5).json()
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        assert health.get("workers") == 2, log.read_text(errors="replace")
        assert sorted(health["worker_pids"].values())[0] == 0  # the remote enclave: no local pid
        with sim_client(url, bundle.policy) as client:
            enclaves = client.attest()  # both verified, each binding its own key
            assert len({e.public_key for e in enclaves}) == 2
            assert all(e.claims.tee == "simulated" for e in enclaves)
            assert client.provision(bundle.key) == 2
            names = ["coffee", "chelsea", "astronaut", "rocket"]
            got = [client.classify(photos[n].read_bytes(), k=5) for n in names]  # alternates workers
        plain = plain_predictor(MODEL)
        for name, answer in zip(names, got):
            assert [p.index for p in answer] == [p.index for p in plain.predict(photos[name].read_bytes(), 5)]
        assert "sandbox: " in enclave_log.read_text() and "seccomp_filter=True" in enclave_log.read_text()
        # The host goes away; the enclave goes back to accepting (one host at a time).
        _stop(server)
        server = None
        time.sleep(0.5)
        assert enclave.poll() is None
        with socket.create_connection(("127.0.0.1", enclave_port), timeout=30) as sock:
            sock.settimeout(30)
            assert sock.recv(4) == b"IEF1"  # a fresh HELLO frame for the next host
    finally:
        if server is not None:
            _stop(server)
        _stop(enclave, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)
