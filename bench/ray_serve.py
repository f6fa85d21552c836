"""Benchmark: infenclave on Ray Serve vs the local server, same machine, one run, loopback only.

    .venv/bin/python bench/ray_serve.py [--seconds 20] [--clients 8]

Everything runs inside a new network namespace (``unshare -n``, loopback up), as the Ray test
does. Both deployments serve Lite0 (`_blocks.3` -> `_conv_head`, verified BackNet) with two
sim enclaves whose model key comes from a key server (no owner):

- local: `infenclave serve BUNDLE --workers 2 --keyserver URL` (one process, socketpair workers,
  in-process batcher);
- ray: `infenclave.host.ray_serve` on a one-machine Ray cluster (ingress, 2 enclave replicas,
  1 BackNet replica with ``@serve.batch``), driven by `tests/ray_scenario.py`.

Measured: requests/s from *clients* concurrent real clients (each attests once, then
classifies the built-in photos in a loop for *seconds*); the time for a new enclave replica to
become ready (its enclave program started, attested to the key server, key released), at
deployment and after a replica is killed (Serve notices, starts a replacement, which
registers); the local server's readiness for comparison. TCP vs local channel figures are
`bench/channel.py`'s (`bench/results/channel.json`), copied in. Results go to
bench/results/ray_serve.json (and stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CUTS = ("_blocks.3", "_conv_head")
PHOTOS = ["coffee", "chelsea", "astronaut", "rocket", "china", "flower", "motorcycle", "retina"]


def _inside(args: dict[str, Any], out: Path) -> None:
    """In the network namespace: the local server, then Ray; one JSON document."""
    import httpx

    sys.path.insert(0, str(ROOT / "tests"))
    import ray_scenario as scenario
    from infenclave.enclave.evidence import SimEvidenceProducer

    work = Path(args["work"])
    result: dict[str, Any] = {}
    images = [Path(p).read_bytes() for p in args["images"]]
    # --- local server
    local = work / "local"
    state = local / "state"
    state.mkdir(parents=True)
    signer = SimEvidenceProducer(state, bytes(32)).signer_public_hex
    policy = local / "release-policy.json"
    policy.write_text(json.dumps({**json.loads(Path(args["policy"]).read_text()), "sim_signers": [signer]}))
    ks, ks_url = scenario._keyserver(args, policy, local / "audit.jsonl", local / "keyserver.log")
    port = scenario._free_port()
    log = local / "serve.log"
    began = time.monotonic()
    server = subprocess.Popen(
        [sys.executable, "-m", "infenclave.cli", "serve", args["bundle"], "--workers", "2", "--keyserver", ks_url]
        + ["--port", str(port), "--state", str(state)],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, ready = time.monotonic() + 120, False
        while time.monotonic() < deadline and not ready:
            if server.poll() is not None:
                raise RuntimeError(log.read_text(errors="replace")[-3000:])
            try:
                ready = httpx.get(url + "/readyz", timeout=5).status_code == 200
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        result["local_ready_s"] = round(time.monotonic() - began, 2)
        scenario.throughput(url, args["policy"], images, 3, 2)  # warm-up
        result["local"] = scenario.throughput(url, args["policy"], images, args["seconds"], args["clients"])
        print("local:", result["local"], flush=True)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        ks.send_signal(signal.SIGINT)
        ks.wait(10)
    # --- Ray (the test's scenario, with the throughput step and without the refused app)
    ray_result: dict[str, Any] = {}
    scenario.run(
        {
            **args,
            "work": str(work / "ray"),
            "bench_seconds": args["seconds"],
            "bench_clients": args["clients"],
            "wrong_measurement": False,
        },
        ray_result,
    )
    result["ray"] = {k: ray_result.get(k) for k in ("bench", "deploy_s", "replicas_at_start", "replaced_s")}
    result["ray"]["replacement"] = ray_result.get("replacement")
    result["ray"]["steps"] = ray_result.get("steps")
    result["ray"]["listening_outside_loopback"] = [
        s for s in ray_result.get("listening", []) if s["address"] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")
    ]
    out.write_text(json.dumps(result, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="Throughput window per deployment.")
    parser.add_argument("--clients", type=int, default=8, help="Concurrent clients.")
    parser.add_argument("--inside", nargs=2, metavar=("ARGS", "OUT"), help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.inside:
        _inside(json.loads(Path(opts.inside[0]).read_text()), Path(opts.inside[1]))
        return 0
    from infenclave.bundle import partition
    from infenclave.models import load_model
    from infenclave.sample_images import builtin_images

    work = Path(tempfile.mkdtemp(prefix="infenclave-bench-ray-"))
    try:
        bundle = partition(load_model("efficientnet-lite0"), *CUTS, work / "bundle")
        photos = builtin_images()
        args = {
            "bundle": str(bundle.bundle_dir),
            "key": str(bundle.key_file),
            "policy": str(bundle.policy_file),
            "images": [str(photos[n]) for n in PHOTOS if n in photos],
            "work": str(work / "run"),
            "seconds": opts.seconds,
            "clients": opts.clients,
        }
        (work / "args.json").write_text(json.dumps(args))
        out = work / "out.json"
        netns = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]
        me = Path(__file__).resolve()
        inner = f'ip link set lo up && exec "{sys.executable}" "{me}" --inside "{work / "args.json"}" "{out}"'
        subprocess.run(
            [*netns, "sh", "-c", inner],
            check=True,
            timeout=900,
            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
        )
        measured = json.loads(out.read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    channel_file = HERE / "results" / "channel.json"
    channel = json.loads(channel_file.read_text()) if channel_file.exists() else None
    local_rps = measured["local"]["requests_per_s"]
    ray_rps = (measured["ray"]["bench"] or {}).get("requests_per_s")
    starts = measured["ray"]["replicas_at_start"] or []
    document = {
        "command": "bench/ray_serve.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average": list(os.getloadavg()),
        },
        "model": "efficientnet-lite0 _blocks.3 -> _conv_head, verified BackNet, sim TEE, 2 enclaves",
        "throughput": {
            "local_serve": measured["local"],
            "ray_serve": measured["ray"]["bench"],
            "ray_over_local": None if not ray_rps else round(ray_rps / local_rps, 3),
        },
        "readiness": {
            "local_serve_ready_s": measured["local_ready_s"],
            "ray_deploy_s": measured["ray"]["deploy_s"],
            "enclave_replicas_at_deploy": [
                {k: r[k] for k in ("enclave_start_s", "key_release_s", "ready_s")} for r in starts
            ],
            "replacement_after_kill_s": measured["ray"]["replaced_s"],
            "replacement": None
            if not measured["ray"]["replacement"]
            else {k: measured["ray"]["replacement"][k] for k in ("enclave_start_s", "key_release_s", "ready_s")},
        },
        "ray_steps": measured["ray"]["steps"],
        "listening_outside_loopback": measured["ray"]["listening_outside_loopback"],
        "channel_tcp_vs_socketpair": None if channel is None else channel.get("classify_end_to_end"),
    }
    text = json.dumps(document, indent=2)
    (HERE / "results" / "ray_serve.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
