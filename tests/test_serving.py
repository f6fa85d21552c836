"""End to end over real processes and sockets: server, enclave workers, client SDK (Lite0).

One server per module (two sim enclave workers), provisioned once by the owner. Every byte
crossing the host is recorded: HTTP requests and responses (headers and bodies, from the
client's side of the socket), every channel frame to and from the enclaves (the host's tap,
``INFENCLAVE_HOST_TAP``) and the host's log (stdout and stderr, enclave stderr included).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from onnx import numpy_helper

from test_serving_support import (
    LITE_CUTS,
    ServerProcess,
    assert_same_top5,
    loaded_model,
    make_bundle,
    plain_predictor,
    sim_client,
)

MODEL = "efficientnet-lite0"


class Recorder:
    """Every HTTP byte the client exchanges with the host (httpx event hooks)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def on_request(self, request: httpx.Request) -> None:
        head = f"{request.method} {request.url}\n".encode() + b"".join(
            k + b": " + v + b"\n" for k, v in request.headers.raw
        )
        with self._lock:
            self.requests.append((request.method, request.url.path))
            self.chunks.append(head + request.read())

    def on_response(self, response: httpx.Response) -> None:
        body = response.read()
        head = b"".join(k + b": " + v + b"\n" for k, v in response.headers.raw)
        with self._lock:
            self.chunks.append(head + body)

    def client(self) -> httpx.Client:
        return httpx.Client(timeout=60, event_hooks={"request": [self.on_request], "response": [self.on_response]})


@pytest.fixture(scope="module")
def bundle():
    return make_bundle(MODEL)


@pytest.fixture(scope="module")
def tap_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tap")


@pytest.fixture(scope="module")
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def server(bundle, tap_dir):
    proc = ServerProcess(bundle.bundle, workers=2, tap_dir=tap_dir)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server, bundle, recorder):
    c = sim_client(server.url, bundle.policy, http=recorder.client())
    c.attest()
    assert c.provision(bundle.key) == 2  # the owner provisions once; both workers hold it
    yield c
    c.close()


@pytest.fixture(scope="module")
def results(client, photos):
    """Confidential top-5 of every built-in photo (used by several tests)."""
    return {name: client.classify(path.read_bytes(), k=5) for name, path in photos.items()}


def test_confidential_top5_equals_plain(results, photos) -> None:
    predictor = plain_predictor(MODEL)
    for name, path in photos.items():
        assert_same_top5(results[name], predictor.predict(path.read_bytes(), 5))


def test_host_learns_nothing(results, photos, bundle, server, tap_dir, recorder) -> None:
    from infenclave.bundle import read_key_file
    from infenclave.enclave.imaging import decode_image, prepare
    from infenclave.network import analyse
    from infenclave.protocol.bundle_format import decode_tail
    from infenclave.split import ternary_split

    channel = b"".join(p.read_bytes() for p in sorted(tap_dir.iterdir()))
    http = b"".join(recorder.chunks)
    log = server.log_path.read_bytes()
    # What the host stores: the sealed model key blob (its only copy of the key).
    stored = b"".join(p.read_bytes() for p in server.state.glob("model-key-*.sealed"))
    assert stored
    seen = {"http": http, "channel": channel, "log": log, "stored": stored}
    # Not vacuous: the HTTP bodies and the IR tensors really went through the recording.
    assert len(http) > sum(p.stat().st_size for p in photos.values())
    assert channel.count(b"IEF1") >= 2 * 2 * len(photos)  # REQUEST, IR1, IR2, RESULT per image
    assert b"serving model" in log

    # Secrets: image files, decoded pixels, the model input, FrontNet/Tail weights, keys.
    needles: dict[str, bytes] = {}
    pre = loaded_model(MODEL).preprocess
    for name, path in photos.items():
        data = path.read_bytes()
        needles[f"{name} file"] = data
        needles[f"{name} pixels"] = decode_image(data).tobytes()
        needles[f"{name} model input"] = prepare(data, pre).tobytes()
    split = ternary_split(analyse(loaded_model(MODEL)), *LITE_CUTS)
    for part, proto in (("frontnet", split.front), ("tail", split.tail)):
        needles[f"{part} weights"] = b"".join(numpy_helper.to_array(t).tobytes() for t in proto.graph.initializer)
    model_key = read_key_file(bundle.key).key
    for where, data in seen.items():
        assert model_key not in data and model_key.hex().encode() not in data, where
        for secret_file in server.state.glob("*.key"):
            secret = secret_file.read_bytes()
            assert secret not in data and secret.hex().encode() not in data, (where, secret_file)
        hit = _shared_run(needles, data)
        assert hit is None, f"a 64-byte run of {hit[0]} appears in the {where} record at {hit[1]}"
        # Labels of the answers: the exact JSON form for every label, and the bare string
        # for labels of 6+ bytes (a shorter string occurs by chance in megabytes of
        # ciphertext and floats: 3 bytes about once per 16 MiB).
        for predictions in results.values():
            for p in predictions:
                assert f'"label":"{p.label}"'.encode() not in data, (where, p.label)
                assert f'"label": "{p.label}"'.encode() not in data, (where, p.label)
                if len(p.label.encode()) >= 6:
                    assert p.label.encode() not in data, (where, p.label)
    # The label list itself travels only inside the encrypted Tail.
    tail_labels = decode_tail(_tail_plaintext(bundle), 1000)[1]
    manifest = (bundle.bundle / "manifest.json").read_bytes()
    assert not any(len(label) >= 6 and label.encode() in manifest for label in tail_labels)


def test_killing_a_worker_mid_load_loses_no_request(server, client, bundle, photos) -> None:
    """8 SDK threads back to back while a worker is killed with SIGKILL: every request is
    answered, each answer is `predict`'s top-5 for that thread's image, and the requests the
    dead worker held were retried on the other worker, sealed afresh (new request id, new
    ciphertext). (*client*: the owner has provisioned, by then.)"""
    import hashlib

    health = server.wait_ready(lambda h: h["workers_ready"] == 2)
    victim = health["worker_pids"]["0"]
    names = sorted(photos)
    images = {n: photos[n].read_bytes() for n in names}
    expected = {n: plain_predictor(MODEL).predict(images[n], 5) for n in names}
    errors: list[BaseException] = []
    ok = 0
    lock = threading.Lock()
    stop = threading.Event()
    sent: list[tuple[str, bytes]] = []  # (request id, SHA-256 of the sealed body) of every POST

    def on_request(request: httpx.Request) -> None:
        if request.url.path == "/v1/classify":
            with lock:
                sent.append((request.headers["x-infenclave-request-id"], hashlib.sha256(request.read()).digest()))

    http = httpx.Client(timeout=60, event_hooks={"request": [on_request]})
    user = sim_client(server.url, bundle.policy, http=http)  # no provisioning: sealed on the host
    lost_before = _count(server, "worker_lost")

    def load(index: int) -> None:
        nonlocal ok
        name = names[index % len(names)]
        while not stop.is_set():
            try:
                preds = user.classify(images[name], 5)
                assert_same_top5(preds, expected[name])
            except BaseException as exc:  # noqa: BLE001 - collected and checked below
                with lock:
                    errors.append(exc)
                continue
            with lock:
                ok += 1

    threads = [threading.Thread(target=load, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while ok < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(victim, signal.SIGKILL)  # mid-load
    after_kill = ok
    health = server.wait_ready(lambda h: h["workers_ready"] == 2 and h["worker_pids"]["0"] != victim, 60)
    while ok < after_kill + 16 and time.monotonic() < deadline + 30:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(60)
    user.close()

    assert errors == [], errors[:3]
    assert ok >= after_kill + 16  # served on after the restart
    # Not vacuous: the kill caught requests in flight, and each was sent again, sealed afresh.
    assert _count(server, "worker_lost") > lost_before
    assert len({rid for rid, _ in sent}) == len(sent) and len({body for _, body in sent}) == len(sent)
    assert health["worker_pids"]["0"] != victim
    assert "unsealed" in server.log()  # the new worker unsealed the stored model key

    # A fresh client (no owner, no provisioning) attests the new worker and is served by it.
    fresh = sim_client(server.url, bundle.policy)
    enclaves = fresh.attest()
    assert len(enclaves) == 2 and all(e.provisioned for e in enclaves)
    for _ in range(2):  # round-robin: both workers, the new one included
        assert_same_top5(fresh.classify(images["coffee"], 5), expected["coffee"])
    fresh.close()
    metrics = httpx.get(server.url + "/metrics").text
    assert "infenclave_worker_restarts_total 1" in metrics


def _count(server, outcome: str) -> float:
    """``infenclave_requests_total{endpoint="classify",outcome=...}`` from /metrics, all codes."""
    prefix = f'infenclave_requests_total{{endpoint="classify",outcome="{outcome}",code="'
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in httpx.get(server.url + "/metrics").text.splitlines()
        if line.startswith(prefix)
    )


def test_metrics_openapi_and_limits(server, client, photos) -> None:
    metrics = httpx.get(server.url + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for stage in ("open", "decode", "frontnet", "backnet", "tail", "seal"):
        assert f'infenclave_stage_seconds_count{{stage="{stage}"}}' in text
    assert 'stage="total"' not in text  # the whole request has its own histogram
    assert 'infenclave_request_seconds_count{endpoint="classify"}' in text
    assert 'infenclave_requests_total{endpoint="classify",outcome="ok",code="200"}' in text
    schema = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/attestation", "/v1/provision", "/v1/classify", "/healthz", "/metrics"} <= set(schema["paths"])

    key = client.attest()[0].key_id  # fresh: a worker was replaced by the test above
    headers = {"X-Infenclave-Enclave-Key": key, "X-Infenclave-Request-Id": "ab" * 16}
    too_big = httpx.post(
        server.url + "/v1/classify", headers=headers, content=b"\0" * (33 * 1024 * 1024 + 1), timeout=60
    )
    assert too_big.status_code == 413 and too_big.json()["error"] == "too_large"
    garbage = httpx.post(server.url + "/v1/classify", headers=headers, content=os.urandom(2048))
    assert garbage.status_code == 400 and garbage.json()["error"] == "enclave_refused"
    # A body declared as anything but application/octet-stream never reaches an enclave.
    typed = httpx.post(
        server.url + "/v1/classify", content=os.urandom(2048), headers={**headers, "Content-Type": "text/plain"}
    )
    assert typed.status_code == 415 and typed.json()["error"] == "unsupported_media_type"
    unknown = httpx.post(
        server.url + "/v1/classify", content=b"x", headers={**headers, "X-Infenclave-Enclave-Key": "00" * 32}
    )
    assert unknown.status_code == 409 and unknown.json()["error"] == "unknown_enclave_key"
    assert httpx.get(server.url + "/v1/attestation", params={"nonce": "00"}).status_code == 422


def _shared_run(needles: dict[str, bytes], haystack: bytes, run: int = 64) -> tuple[str, int] | None:
    """(label, offset) of a *run*-byte window of *haystack* equal to one of a needle's, or None.

    Every *run*-aligned window of each needle is looked for; a shared run of 2*run bytes or
    more always contains one. Windows with fewer than 8 distinct byte values (flat image
    regions, zero padding) are skipped: they say nothing about the secret and do occur in
    any float tensor. Fast path: 8-byte prefixes matched with numpy, then full compares.
    """
    if len(haystack) < run:
        return None
    # Key each chunk by an 8-byte piece with at least 6 distinct bytes, so that the prefilter
    # does not fire on the runs of zeros every float tensor has.
    chunks: dict[bytes, list[tuple[bytes, str, int]]] = {}
    for label, needle in needles.items():
        for off in range(0, len(needle) - run + 1, run):
            chunk = needle[off : off + run]
            if len(set(chunk)) < 8:
                continue
            for j in range(run - 7):
                if len(set(chunk[j : j + 8])) >= 6:
                    chunks.setdefault(chunk[j : j + 8], []).append((chunk, label, j))
                    break
    if not chunks:
        return None
    keys = np.frombuffer(b"".join(chunks), dtype="<u8")
    # Every 8-byte window of the haystack as one uint64; a 2**24-entry hash table of the
    # keys finds the few candidate offsets, which are then compared exactly.
    windows = np.ndarray(shape=(len(haystack) - 7,), dtype="<u8", buffer=haystack, strides=(1,))
    table = np.zeros(1 << 24, dtype=bool)
    table[_hash24(keys)] = True
    for offset in np.flatnonzero(table[_hash24(windows)]):
        for chunk, label, j in chunks.get(haystack[offset : offset + 8], ()):
            start = int(offset) - j
            if start >= 0 and haystack[start : start + run] == chunk:
                return label, start
    return None


def _hash24(values: np.ndarray) -> np.ndarray:
    """A 24-bit multiplicative hash of uint64 values (Knuth's golden-ratio constant)."""
    with np.errstate(over="ignore"):
        return (values * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)


def _tail_plaintext(bundle) -> bytes:
    from infenclave.bundle import read_key_file, read_manifest
    from infenclave.protocol.bundle_format import PART_FILES, decrypt_part

    manifest = read_manifest(bundle.bundle)
    blob = (bundle.bundle / PART_FILES["tail"]).read_bytes()
    return decrypt_part(manifest, "tail", blob, read_key_file(bundle.key).key)


def test_shared_run_finds_a_planted_run() -> None:
    """The detector used above is not blind: a planted 64-byte run of a secret is found."""
    secret = os.urandom(4096)
    haystack = os.urandom(100_000) + secret[1000:1200] + os.urandom(1000)
    assert _shared_run({"secret": secret}, haystack) == ("secret", 100_000 + 24)
    assert _shared_run({"secret": secret}, os.urandom(200_000)) is None
