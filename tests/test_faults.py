"""Faults played for real against real processes: crashed workers, a killed host, damaged
sealed state, a full disk, a decompression bomb, slow-header clients.

Every server here is `infenclave serve` as a subprocess on 127.0.0.1 (sim backend, Lite0, two
enclave workers); faults are real signals, real files and a real tmpfs. Each test checks that
every request ends with a correct answer or a clear error within its timeout, and that no
answer reaches another client (each thread checks its own image's top-5 against `predict`;
an answer sealed to another client would not open).
"""

from __future__ import annotations

import io
import os
import selectors
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from infenclave.errors import ImageError, ServerError, WorkerCrashed
from test_serving_support import (
    ServerProcess,
    assert_same_top5,
    make_bundle,
    plain_predictor,
    sim_client,
)

MODEL = "efficientnet-lite0"
HEADER_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def bundle():
    return make_bundle(MODEL)


@pytest.fixture(scope="module")
def server(bundle):
    """Default pixel cap and memory limit; a short header deadline so the test is quick."""
    proc = ServerProcess(bundle.bundle, workers=2, extra=("--header-timeout", str(HEADER_TIMEOUT_S)))
    owner = sim_client(proc.url, bundle.policy)
    owner.provision(bundle.key)
    owner.close()
    proc.wait_ready(lambda h: h["workers_ready"] == 2)
    yield proc
    proc.stop()


class Load:
    """*n* SDK threads sending back to back, each its own photo, each answer checked."""

    def __init__(self, client, photos: dict[str, Path], n: int) -> None:
        self.client = client
        names = sorted(photos)
        self.images = [photos[names[i % len(names)]].read_bytes() for i in range(n)]
        self.expected = [plain_predictor(MODEL).predict(image, 5) for image in self.images]
        self.ok = 0
        self.errors: list[BaseException] = []
        self.slowest = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(n)]

    def _run(self, i: int) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                assert_same_top5(self.client.classify(self.images[i], 5), self.expected[i])
            except BaseException as exc:  # noqa: BLE001 - collected and checked by the test
                with self._lock:
                    self.errors.append(exc)
            else:
                with self._lock:
                    self.ok += 1
            with self._lock:
                self.slowest = max(self.slowest, time.monotonic() - started)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(90)

    def wait_for(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.ok < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.ok >= count, f"only {self.ok} answers in {timeout} s ({self.errors[:3]})"


def _count(server: ServerProcess, outcome: str) -> float:
    total = 0.0
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(f'infenclave_requests_total{{endpoint="classify",outcome="{outcome}"'):
            total += float(line.rsplit(" ", 1)[1])  # summed over any further labels
    return total


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # a zombie of ours is gone too
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
                return True
        except (OSError, IndexError):
            return True
        time.sleep(0.05)
    return False


# --- a crashed worker -------------------------------------------------------------------


def test_requests_a_crashed_worker_held_fail_clearly_and_are_not_retried(server, bundle, photos) -> None:
    """SIGSEGV (a decoder crash, as the host sees it): the requests inside that worker fail
    with `WorkerCrashed`, each exactly once (the count equals the server's), never retried on
    the other worker; requests it did not hold are answered."""
    victim = server.wait_ready(lambda h: h["workers_ready"] == 2)["worker_pids"]["1"]
    crashed_before = _count(server, "worker_crashed")
    client = sim_client(server.url, bundle.policy)
    with Load(client, photos, 8) as load:
        load.wait_for(8)
        os.kill(victim, signal.SIGSEGV)
        server.wait_ready(lambda h: h["workers_ready"] == 2 and h["worker_pids"]["1"] != victim, 60)
        load.wait_for(load.ok + 8)
    client.close()
    crashed = _count(server, "worker_crashed") - crashed_before
    assert crashed >= 1, f"the crash caught no request in the enclave: {load.errors[:3]} " + "\n".join(
        line for line in server.log().splitlines() if " 503" in line or "WARNING" in line
    )
    assert load.errors and all(isinstance(e, WorkerCrashed) for e in load.errors), load.errors[:3]
    assert len(load.errors) == crashed  # one client error per crashed request: none retried
    assert "crashed (SIGSEGV)" in server.log()


class _Tamper(httpx.BaseTransport):
    """The network (or the host's front) flipping one bit of each classify request or answer."""

    def __init__(self, where: str) -> None:
        self.inner = httpx.HTTPTransport()
        self.where = where
        self.posts = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path != "/v1/classify":
            return self.inner.handle_request(request)
        self.posts += 1
        if self.where == "request":
            body = bytearray(request.read())
            body[len(body) // 2] ^= 1
            request = httpx.Request(request.method, request.url, headers=request.headers, content=bytes(body))
        response = self.inner.handle_request(request)
        if self.where == "answer" and response.status_code == 200:
            body = bytearray(response.read())
            body[len(body) // 2] ^= 1
            return httpx.Response(200, headers=response.headers, content=bytes(body))
        return response


@pytest.mark.parametrize("where", ["request", "answer"])
def test_refusals_and_integrity_failures_are_never_retried(server, bundle, photos, where) -> None:
    """A request the enclave refuses (it does not open) and an answer that fails to open are
    each sent exactly once: only a lost worker is retried."""
    from infenclave.errors import VerificationError

    tamper = _Tamper(where)
    client = sim_client(server.url, bundle.policy, http=httpx.Client(transport=tamper, timeout=30))
    expected = (ServerError, "enclave_refused") if where == "request" else (VerificationError, "not sealed")
    with pytest.raises(expected[0], match=expected[1]):
        client.classify(photos["coffee"].read_bytes(), 5)
    client.close()
    assert tamper.posts == 1


# --- bounds: pixel cap, slow headers -----------------------------------------------------


def _rgba_png_bomb(side: int = 8000) -> bytes:
    """A 64-megapixel RGBA PNG: ~260 KiB on the wire, ~1.35 GB through decode."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGBA", (side, side), (10, 200, 30, 128)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_png_bomb_under_the_enclave_cap_is_refused_by_the_serving_cap(server, bundle, photos) -> None:
    client = sim_client(server.url, bundle.policy)
    started = time.monotonic()
    with pytest.raises(ImageError, match="8000x8000 pixels; the limit is 24000000"):
        client.classify(_rgba_png_bomb(), 5)
    assert time.monotonic() - started < 10  # refused from the header, not decoded
    image = photos["coffee"].read_bytes()
    assert_same_top5(client.classify(image, 5), plain_predictor(MODEL).predict(image, 5))
    client.close()


def test_slow_header_clients_do_not_starve_health_or_classify(server, bundle, photos) -> None:
    """500 connections that send their request head one byte every 0.5 s: /healthz and
    classify are answered meanwhile, and the server answers 408 and closes each slow
    connection once the header deadline passes (uvicorn alone would keep them for ever)."""
    image = photos["coffee"].read_bytes()
    expected = plain_predictor(MODEL).predict(image, 5)
    client = sim_client(server.url, bundle.policy)
    client.attest()
    selector = selectors.DefaultSelector()
    socks = []
    for _ in range(500):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        socks.append(sock)
    opened = time.monotonic()
    closed: dict[socket.socket, float] = {}
    answered_408 = 0
    health_latency: list[float] = []
    classify_latency: list[float] = []
    next_trickle = opened
    try:
        while len(closed) < len(socks) and time.monotonic() - opened < HEADER_TIMEOUT_S + 8:
            now = time.monotonic()
            if now >= next_trickle:  # one more header byte on every open connection
                for sock in socks:
                    if sock not in closed:
                        try:
                            sock.send(b"X")
                        except OSError:
                            closed[sock] = time.monotonic() - opened
                next_trickle = now + 0.5
                if len(health_latency) < 3:  # the API answers meanwhile
                    t = time.monotonic()
                    assert httpx.get(server.url + "/healthz", timeout=5).json()["workers_ready"] == 2
                    health_latency.append(time.monotonic() - t)
                    t = time.monotonic()
                    assert_same_top5(client.classify(image, 5), expected)
                    classify_latency.append(time.monotonic() - t)
            for key, _ in selector.select(timeout=0.1):
                sock = key.fileobj
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data.startswith(b"HTTP/1.1 408"):
                    answered_408 += 1
                if not data or data.startswith(b"HTTP/1.1 408"):
                    selector.unregister(sock)
                    closed[sock] = time.monotonic() - opened
    finally:
        for sock in socks:
            sock.close()
        selector.close()
        client.close()
    assert len(health_latency) == 3 and max(health_latency) < 2.0, health_latency
    assert len(classify_latency) == 3 and max(classify_latency) < 10.0, classify_latency
    assert len(closed) == 500, f"{500 - len(closed)} slow connections still open"
    assert min(closed.values()) >= HEADER_TIMEOUT_S - 0.5  # not closed before the deadline
    assert max(closed.values()) <= HEADER_TIMEOUT_S + 5
    assert answered_408 >= 450


# --- the host killed and restarted; damaged sealed state ----------------------------------


def test_a_killed_host_restarts_from_sealed_state_and_damage_asks_for_the_owner(bundle, photos) -> None:
    image = photos["chelsea"].read_bytes()
    expected = plain_predictor(MODEL).predict(image, 5)
    state = Path(tempfile.mkdtemp(prefix="state-killed-host-"))
    first = ServerProcess(bundle.bundle, workers=2, state=state)
    owner = sim_client(first.url, bundle.policy)
    owner.provision(bundle.key)
    owner.close()
    workers = list(first.wait_ready(lambda h: h["workers_ready"] == 2)["worker_pids"].values())
    assert list(state.glob("model-key-*.sealed")), first.log()[-2000:]
    client = sim_client(first.url, bundle.policy, timeout=20)
    with Load(client, photos, 4) as load:
        load.wait_for(4)
        first.process.kill()  # SIGKILL the host mid-load
        first.process.wait()
        time.sleep(1.0)
    client.close()
    first.stop()
    # The workers see their channel close and exit: nothing is left behind.
    assert all(_gone(pid, 10) for pid in workers), "enclave workers outlived their host"
    # Requests in flight failed clearly (the server is gone), within the client's timeout.
    assert all(isinstance(e, ServerError) for e in load.errors), load.errors[:3]
    assert load.slowest < 25

    # Started again on the same state: workers unseal the stored key, no owner needed.
    second = ServerProcess(bundle.bundle, workers=2, state=state, ready=lambda h: h["workers_ready"] == 2)
    try:
        user = sim_client(second.url, bundle.policy)
        assert all(e.provisioned for e in user.attest())
        assert_same_top5(user.classify(image, 5), expected)
        user.close()
    finally:
        second.stop()

    # Damaged sealed state: refused clearly, set aside, and the owner must provision again.
    sealed = next(state.glob("model-key-*.sealed"))
    blob = bytearray(sealed.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    sealed.write_bytes(bytes(blob))
    third = ServerProcess(bundle.bundle, workers=2, state=state)
    try:
        health = third.health()
        assert health["status"] == "reprovision_needed" and health["workers_ready"] == 0
        assert "provision the model key again" in health["reprovision_needed"]
        assert list(state.glob("model-key-*.sealed.unopenable-*"))
        user = sim_client(third.url, bundle.policy)
        with pytest.raises(ServerError, match="not_provisioned"):
            user.classify(image, 5)
        owner = sim_client(third.url, bundle.policy)
        assert owner.provision(bundle.key) == 2
        owner.close()
        assert_same_top5(user.classify(image, 5), expected)
        assert third.health()["status"] == "ok"
        user.close()
    finally:
        third.stop()


# --- a full disk, and a bomb let through to the memory limit --------------------------------


@pytest.fixture
def tiny_state():
    """A 64 KiB tmpfs as the state directory (needs root to mount)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs to fill needs root")
    mount = Path(tempfile.mkdtemp(prefix="state-tmpfs-"))
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)
    os.rmdir(mount)


def test_a_full_state_disk_and_a_bomb_under_the_memory_limit(bundle, photos, tiny_state) -> None:
    """The state directory fills up before the owner provisions: provisioning still works
    (the sealed key is kept in memory, /healthz says it was not stored), a worker killed
    afterwards comes back from the copy in memory, and load is served throughout. With the
    pixel cap raised to the enclave's own, a 64-megapixel PNG bomb is contained by the
    worker's memory limit: that worker is OOM-killed, the request fails clearly and is not
    retried, the worker restarts and the others keep serving."""
    server = ServerProcess(
        bundle.bundle, workers=2, state=tiny_state, extra=("--max-pixels", "64000000", "--worker-memory", "640M")
    )
    try:
        if "memory limit 640 MiB" not in server.log():
            pytest.skip("no writable cgroup memory controller here: " + server.log()[-300:])
        fd = os.open(tiny_state / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:  # fill the tmpfs to the last byte
            for size in (4096, 512, 1):
                try:
                    while True:
                        os.write(fd, b"\0" * size)
                except OSError:
                    pass
        finally:
            os.close(fd)
        owner = sim_client(server.url, bundle.policy)
        assert owner.provision(bundle.key) == 2
        owner.close()
        health = server.health()
        assert health["status"] == "ok" and "could not be stored" in health["state_error"]
        assert not list(tiny_state.glob("model-key-*"))  # no half-written file left behind

        client = sim_client(server.url, bundle.policy, timeout=30)
        victim = health["worker_pids"]["0"]
        with Load(client, photos, 4) as load:
            load.wait_for(4)
            os.kill(victim, signal.SIGKILL)  # the restart must unseal from memory
            server.wait_ready(lambda h: h["workers_ready"] == 2 and h["worker_pids"]["0"] != victim, 60)
            load.wait_for(load.ok + 4)
            bomber = sim_client(server.url, bundle.policy, timeout=60)
            with pytest.raises(WorkerCrashed, match="ran out of memory"):
                bomber.classify(_rgba_png_bomb(), 5)  # exactly at the 64 M cap: decoded
            bomber.close()
            load.wait_for(load.ok + 4)
        client.close()
        # Bystanders: answered, or (those inside the bombed worker with it) failed clearly.
        assert all(isinstance(e, WorkerCrashed) for e in load.errors), load.errors[:3]
        assert load.slowest < 30
        assert "ran out of its memory limit" in server.log()  # the cgroup's oom_kill count
        server.wait_ready(lambda h: h["workers_ready"] == 2, 60)
    finally:
        server.stop()
