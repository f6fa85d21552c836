"""One Ray Serve scenario, run by `tests/test_ray_serve.py` (and `bench/ray_serve.py`) inside a
new network namespace (``unshare -n``, loopback up): nothing it starts can reach, or be reached
from, any address but 127.0.0.1.

    python tests/ray_scenario.py ARGS.json RESULT.json

It starts two key servers (the owner's policy, and one pinning another measurement), a Ray
cluster on 127.0.0.1 (no dashboard, no Ray Client), Serve's HTTP proxy on 127.0.0.1 and the
infenclave application (`infenclave.host.ray_serve`); it plays the real client (attest,
classify: the model key came from the key server), kills an enclave replica while requests
are in flight, waits for its replacement, lists the listening sockets of its process tree,
deploys an application whose key server refuses the enclave's measurement, and writes what
it saw as JSON. Every step has a deadline; Ray is stopped at the end whatever happens.
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
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the key server exited early")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def _keyserver(args: dict[str, Any], policy: Path, audit: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "infenclave.cli", "keyserver", args["key"], "--policy", str(policy)]
        + ["--allow-simulation", "--listen", f"127.0.0.1:{port}", "--audit-log", str(audit)],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    _wait_port(port, process)
    return process, f"http://127.0.0.1:{port}"


def _ray_temp_dir() -> str:
    """Ray's session folder, short: its AF_UNIX socket paths must stay under 108 bytes."""
    return tempfile.mkdtemp(prefix="ray-", dir="/tmp")


def _listening(pids: list[int]) -> list[dict[str, Any]]:
    """Listening sockets (TCP) and bound UDP sockets of the given processes."""
    import psutil

    found = []
    for pid in pids:
        try:
            connections = psutil.Process(pid).net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in connections:
            if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and c.laddr):
                found.append({"pid": pid, "address": c.laddr.ip, "port": c.laddr.port})
    return found


def _client(url: str, policy: str) -> Any:
    from infenclave.client import Client, SimulationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulationWarning)
        return Client(url, policy, allow_simulation=True, timeout=60)


def _load(url: str, policy: str, images: list[bytes], stop: threading.Event, out: dict[str, Any]) -> None:
    """One client classifying in a loop until *stop*; every outcome counted."""
    with _client(url, policy) as client:
        while not stop.is_set():
            try:
                client.classify(images[out["ok"] % len(images)], k=5)
                out["ok"] += 1
            except Exception as exc:  # noqa: BLE001 - counted and reported
                out["errors"].append(f"{type(exc).__name__}: {exc}")


def run(args: dict[str, Any], result: dict[str, Any]) -> None:
    import psutil
    import ray
    from ray import serve

    from infenclave.enclave.evidence import SimEvidenceProducer
    from infenclave.host.ray_serve import RayOptions, build_app, registry
    from infenclave.host.server import ServerConfig

    work = Path(args["work"])
    state = work / "state"
    state.mkdir(parents=True)
    signer = SimEvidenceProducer(state, bytes(32)).signer_public_hex  # the node's sim signer
    policy_doc = json.loads(Path(args["policy"]).read_text())
    good = work / "release-policy.json"
    good.write_text(json.dumps({**policy_doc, "sim_signers": [signer]}))
    wrong = work / "wrong-policy.json"  # pins another enclave measurement
    wrong.write_text(json.dumps({**policy_doc, "sim_signers": [signer], "measurements": {"sim": ["11" * 32]}}))
    ks, ks_url = _keyserver(args, good, work / "audit.jsonl", work / "keyserver.log")
    ks_wrong, ks_wrong_url = _keyserver(args, wrong, work / "audit-wrong.jsonl", work / "keyserver-wrong.log")
    result["steps"] = []

    def step(name: str) -> None:
        result["steps"].append([name, round(time.monotonic() - t0, 2)])
        print(f"[{time.monotonic() - t0:6.1f}s] {name}", flush=True)

    t0 = time.monotonic()
    port = _free_port()
    ray_dir = _ray_temp_dir()
    try:
        ray.init(
            _node_ip_address="127.0.0.1",
            _temp_dir=ray_dir,
            include_dashboard=False,
            num_cpus=2,
            resources={"tee": 8},
            namespace="infenclave",
            log_to_driver=False,
            configure_logging=False,
        )
        step("ray started")
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        step("serve started")
        config = ServerConfig(
            bundle_dir=Path(args["bundle"]),
            state_dir=state,
            keyserver=ks_url,
            max_batch=8,
            request_timeout=30.0,
            worker_memory=None,
        )
        options = RayOptions(enclaves=args.get("enclaves", 2), app_name="infenclave")
        began = time.monotonic()
        serve.run(build_app(config, options), name="infenclave", route_prefix="/", blocking=False)
        result["deploy_s"] = round(time.monotonic() - began, 2)
        step("application running")
        url = f"http://127.0.0.1:{port}"
        reg = registry("infenclave")
        result["replicas_at_start"] = ray.get(reg.history.remote())
        images = [Path(p).read_bytes() for p in args["images"]]
        with _client(url, args["policy"]) as client:
            enclaves = client.attest()
            result["attested"] = [e.key_id for e in enclaves]
            result["attested_tee"] = sorted({e.claims.tee for e in enclaves})
            result["top5"] = [[p.index for p in client.classify(image, k=5)] for image in images]
            result["probs"] = [[p.prob for p in client.classify(image, k=5)] for image in images]
        result["readyz"] = json.loads(_get(url + "/readyz"))
        step("classified through ray")
        if args.get("bench_seconds"):
            result["bench"] = throughput(url, args["policy"], images, args["bench_seconds"], args["bench_clients"])
            step("throughput measured")
        # Listening sockets of the whole Ray process tree (and the key servers).
        tree = [os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))]
        result["listening"] = _listening(tree)
        result["tree_size"] = len(tree)
        step("sockets listed")
        # An enclave replica killed while requests are in flight.
        live = ray.get(reg.live.remote())
        victim_key, victim = sorted(live.items())[0]
        stop = threading.Event()
        loads = [{"ok": 0, "errors": []} for _ in range(2)]
        threads = [threading.Thread(target=_load, args=(url, args["policy"], images, stop, o)) for o in loads]
        for t in threads:
            t.start()
        time.sleep(3.0)
        before = sum(o["ok"] for o in loads)
        killed_at = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)
        step(f"killed enclave replica pid {victim['pid']}")
        deadline = time.monotonic() + args.get("replace_timeout", 90)
        replacement = None
        while time.monotonic() < deadline and replacement is None:
            fresh = [e for e in ray.get(reg.history.remote()) if e["key_id"] not in live]
            replacement = fresh[0] if fresh else None
            time.sleep(0.2)
        result["replaced_s"] = None if replacement is None else round(time.monotonic() - killed_at, 2)
        result["replacement"] = replacement
        time.sleep(2.0)
        stop.set()
        for t in threads:
            t.join(60)
        result["load"] = {"ok_before_kill": before, "ok": sum(o["ok"] for o in loads)}
        result["load_errors"] = [e for o in loads for e in o["errors"]]
        step("replacement registered")
        with _client(url, args["policy"]) as client:
            enclaves = client.attest()
            result["attested_after"] = [e.key_id for e in enclaves]
            result["top5_after"] = [[p.index for p in client.classify(image, k=5)] for image in images * 2]
        result["victim_key"] = victim_key
        result["victim_alive"] = psutil.pid_exists(victim["pid"]) and psutil.Process(victim["pid"]).status() != "zombie"
        result["victim_enclave_alive"] = psutil.pid_exists(victim["enclave_pid"]) and (
            psutil.Process(victim["enclave_pid"]).status() != "zombie"
        )
        step("served again after the kill")
        # A key server that pins another measurement: the replica never gets the key.
        if args.get("wrong_measurement", True):
            wrong_config = ServerConfig(
                bundle_dir=Path(args["bundle"]), state_dir=state, keyserver=ks_wrong_url, worker_memory=None
            )
            wrong_options = RayOptions(enclaves=1, app_name="wrong", release_attempts=1, constructor_retries=1)
            try:
                serve.run(build_app(wrong_config, wrong_options), name="wrong", route_prefix="/wrong", blocking=False)
                result["wrong_deployed"] = True
            except Exception as exc:  # noqa: BLE001 - the expected outcome, reported
                result["wrong_deployed"] = False
                result["wrong_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            status = serve.status().applications.get("wrong")
            result["wrong_status"] = None if status is None else str(status.status)
            result["wrong_registered"] = ray.get(registry("wrong").history.remote())
            step("wrong measurement refused")
        result["audit"] = [json.loads(x) for x in (work / "audit.jsonl").read_text().splitlines()]
        wrong_audit = work / "audit-wrong.jsonl"
        result["audit_wrong"] = (
            [json.loads(x) for x in wrong_audit.read_text().splitlines()] if wrong_audit.exists() else []
        )
    finally:
        for name in ("serve", "ray"):
            try:
                (serve.shutdown if name == "serve" else ray.shutdown)()
            except Exception:  # noqa: BLE001 - stopping: report, go on
                traceback.print_exc()
        for process in (ks, ks_wrong):
            process.send_signal(signal.SIGINT)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(ray_dir, ignore_errors=True)
        step("stopped")
        result["left_over"] = [p.pid for p in psutil.Process().children(recursive=True)]


def _get(url: str) -> str:
    import httpx

    return httpx.get(url, timeout=30).text


def throughput(url: str, policy: str, images: list[bytes], seconds: float, clients: int) -> dict[str, Any]:
    """Requests per second from *clients* concurrent clients (each attests before the clock)."""
    stop = threading.Event()
    loads = [{"ok": 0, "errors": []} for _ in range(clients)]
    for o in loads:  # attest before the clock starts
        o["client"] = _client(url, policy)
        o["client"].attest()

    def loop(o: dict[str, Any]) -> None:
        client = o["client"]
        while not stop.is_set():
            try:
                client.classify(images[o["ok"] % len(images)], k=5)
                o["ok"] += 1
            except Exception as exc:  # noqa: BLE001
                o["errors"].append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=loop, args=(o,)) for o in loads]
    began = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    elapsed = time.monotonic() - began
    for o in loads:
        o["client"].close()
    ok = sum(o["ok"] for o in loads)
    return {
        "clients": clients,
        "seconds": round(elapsed, 2),
        "requests": ok,
        "requests_per_s": round(ok / elapsed, 2),
        "errors": [e for o in loads for e in o["errors"]][:10],
    }


def run_cli(args: dict[str, Any], result: dict[str, Any]) -> None:
    """`infenclave serve --ray` as a user runs it: ready, classifies, Ctrl-C stops it all."""
    import httpx
    import psutil

    from infenclave.enclave.evidence import SimEvidenceProducer

    work = Path(args["work"])
    state = work / "state"
    state.mkdir(parents=True)
    signer = SimEvidenceProducer(state, bytes(32)).signer_public_hex
    policy = work / "release-policy.json"
    policy.write_text(json.dumps({**json.loads(Path(args["policy"]).read_text()), "sim_signers": [signer]}))
    ks, ks_url = _keyserver(args, policy, work / "audit.jsonl", work / "keyserver.log")
    port = _free_port()
    log = work / "serve.log"
    ray_dir = _ray_temp_dir()
    began = time.monotonic()
    server = subprocess.Popen(
        [sys.executable, "-m", "infenclave.cli", "serve", args["bundle"], "--ray", "--keyserver", ks_url]
        + ["--ray-enclaves", "1", "--port", str(port), "--state", str(state), "--worker-memory", "0"],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONUNBUFFERED="1", RAY_TMPDIR=ray_dir),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, ready = time.monotonic() + 150, False
        while time.monotonic() < deadline and not ready:
            if server.poll() is not None:
                raise RuntimeError(log.read_text(errors="replace")[-4000:])
            try:
                ready = httpx.get(url + "/readyz", timeout=5).status_code == 200
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        if not ready:
            raise TimeoutError(log.read_text(errors="replace")[-4000:])
        result["ready_s"] = round(time.monotonic() - began, 2)
        images = [Path(p).read_bytes() for p in args["images"]]
        with _client(url, args["policy"]) as client:
            result["top5"] = [[p.index for p in client.classify(image, k=5)] for image in images[:1]]
        tree = [server.pid, *(p.pid for p in psutil.Process(server.pid).children(recursive=True))]
        result["listening"] = _listening(tree)
        result["tree_size"] = len(tree)
        server.send_signal(signal.SIGINT)
        result["exit_code"] = server.wait(60)
        time.sleep(1.0)
        result["left_over"] = [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    finally:
        if server.poll() is None:
            server.kill()
        ks.send_signal(signal.SIGINT)
        ks.wait(10)
        shutil.rmtree(ray_dir, ignore_errors=True)
        result["log_tail"] = log.read_text(errors="replace")[-2000:]


def main() -> int:
    args = json.loads(Path(sys.argv[1]).read_text())
    result: dict[str, Any] = {}
    code = 0
    try:
        (run_cli if args.get("mode") == "cli" else run)(args, result)
    except Exception:  # noqa: BLE001 - the test reads the traceback from the result
        result["error"] = traceback.format_exc()
        code = 1
    Path(sys.argv[2]).write_text(json.dumps(result, indent=1, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
