"""Benchmark: confidential serving vs plain HTTP serving of the same model, same machine, one run.

    .venv/bin/python bench/serve.py [--model efficientnet-lite0] [--requests 40] [--seconds 20]

All three servers are real processes on 127.0.0.1 with the same stack (FastAPI + uvicorn, ONNX
Runtime, dynamic batching of concurrent requests):

- confidential: `infenclave serve` (sim backend, 2 enclave workers): HPKE-sealed image ->
  enclave decode + FrontNet -> host BackNet (batched) -> enclave Tail -> sealed top-5.
- confidential_unverified: the same, from a bundle partitioned with ``--unverified-backnet``
  (the enclave does not check the host's BackNet work; "verification off").
- plain: this file's ``--plain-server`` mode: image bytes -> decode + preprocess (thread
  pool) -> the whole model on ONNX Runtime (the same batcher) -> top-5 JSON.

Measured: latency at concurrency 1 (sequential requests after warm-up: mean, p50, p90) and
throughput at concurrency 32 (32 client threads for a fixed time). The photos cycle through
the 8 built-in images. Results go to bench/results/serve.json (and stdout).
"""

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
CUTS = ("_blocks.3", "_conv_head")


def plain_server(model_ref: str, port: int) -> None:
    """The baseline: plain HTTP serving of the whole model, same stack as the host server."""
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from infenclave.enclave.imaging import prepare
    from infenclave.enclave.topk import top_k
    from infenclave.host.backnet import BackNet, BackNetBatcher
    from infenclave.models import load_model
    from infenclave.network import analyse

    model = load_model(model_ref)
    whole = BackNet(analyse(model).onnx_bytes())
    app = FastAPI()
    state: dict = {}

    @app.on_event("startup")
    async def start() -> None:
        state["batcher"] = BackNetBatcher(whole, max_batch=32)
        state["batcher"].start()

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/classify")
    async def classify(request: Request) -> JSONResponse:
        body = await request.body()
        x = await asyncio.get_running_loop().run_in_executor(None, prepare, body, model.preprocess)
        (scores, *_) = await state["batcher"].run(x)
        preds = top_k(scores[0], model.labels, 5)
        return JSONResponse([p.to_dict() for p in preds])

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def _wait(url: str, proc: subprocess.Popen, ready=lambda h: True) -> None:
    import httpx

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited")
        try:
            if ready(httpx.get(url + "/healthz", timeout=2).json()):
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def _latency(call, images: list[bytes], n: int) -> dict:
    for image in images[:4]:
        call(image)  # warm-up
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        call(images[i % len(images)])
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return {
        "requests": n,
        "mean_ms": statistics.mean(samples),
        "p50_ms": samples[n // 2],
        "p90_ms": samples[int(n * 0.9)],
    }


def _throughput(call, images: list[bytes], concurrency: int, seconds: float) -> dict:
    done = [0] * concurrency
    errors: list[str] = []
    stop = threading.Event()

    def worker(i: int) -> None:
        j = i
        while not stop.is_set():
            try:
                call(images[j % len(images)])
                done[i] += 1
            except Exception as exc:  # noqa: BLE001 - counted, reported
                errors.append(type(exc).__name__)
            j += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        "seconds": elapsed,
        "requests": sum(done),
        "images_per_s": sum(done) / elapsed,
        "errors": len(errors),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--requests", type=int, default=40, help="sequential requests for latency")
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of the throughput run")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="enclave workers")
    parser.add_argument("--plain-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "serve.json")
    args = parser.parse_args()
    if args.plain_server:
        plain_server(args.model, args.plain_server)
        return

    import httpx

    from infenclave.bundle import partition
    from infenclave.client import Client, SimulationWarning
    from infenclave.models import load_model
    from infenclave.sample_images import builtin_images

    sys.path.insert(0, str(HERE.parent / "tests"))
    from test_serving_support import free_port

    images = [p.read_bytes() for p in builtin_images().values()]
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    # Verification on (the default bundle) and off (partitioned with --unverified-backnet).
    results = {
        "confidential": partition(load_model(args.model), *CUTS, work / "bundle"),
        "confidential_unverified": partition(
            load_model(args.model), *CUTS, work / "bundle-unverified", unverified_backnet=True
        ),
    }
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    ports, plain_port = {name: free_port() for name in results}, free_port()
    log = open(work / "servers.log", "wb")
    servers = {
        name: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "infenclave.cli",
                "serve",
                str(r.bundle_dir),
                "--port",
                str(ports[name]),
                "--workers",
                str(args.workers),
                "--log-level",
                "warning",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        for name, r in results.items()
    }
    plain = subprocess.Popen(
        [sys.executable, __file__, "--model", args.model, "--plain-server", str(plain_port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    report: dict = {}
    load_before = os.getloadavg()
    try:
        urls, plain_url = {n: f"http://127.0.0.1:{p}" for n, p in ports.items()}, f"http://127.0.0.1:{plain_port}"
        for name, proc in servers.items():
            _wait(urls[name], proc, lambda h: h["workers"] == args.workers)
        _wait(plain_url, plain)
        calls = {"plain": lambda image: plain_http.post(plain_url + "/classify", content=image).raise_for_status()}
        for name, r in results.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SimulationWarning)
                client = Client(
                    urls[name],
                    r.policy_file,
                    allow_simulation=True,
                    http=httpx.Client(timeout=120, limits=httpx.Limits(max_connections=64)),
                )
            client.provision(r.key_file)
            calls[name] = lambda image, client=client: client.classify(image, 5)
        plain_http = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=64))

        # Interleave them so that background load on a shared machine hits all alike.
        for name, call in calls.items():
            report.setdefault(name, {})["latency_c1"] = _latency(call, images, args.requests)
        for name, call in calls.items():
            report[name]["throughput"] = _throughput(call, images, args.concurrency, args.seconds)
        metrics = {name: httpx.get(url + "/metrics").text for name, url in urls.items()}
    finally:
        for proc in (*servers.values(), plain):
            proc.terminate()
            proc.wait(30)
        log.close()
    lat = {n: r["latency_c1"]["mean_ms"] / report["plain"]["latency_c1"]["mean_ms"] for n, r in report.items()}
    thr = {
        n: r["throughput"]["images_per_s"] / report["plain"]["throughput"]["images_per_s"] for n, r in report.items()
    }
    report["comparison"] = {
        "latency_c1_confidential_over_plain": lat["confidential"],
        "throughput_c32_confidential_over_plain": thr["confidential"],
        "latency_c1_unverified_over_plain": lat["confidential_unverified"],
        "throughput_c32_unverified_over_plain": thr["confidential_unverified"],
        "confidential_is_verified_backnet": True,
        "target": "confidential within 15% of plain: latency ratio <= 1.15, throughput ratio >= 0.85",
    }
    report["setup"] = {
        "model": args.model,
        "cut": list(CUTS),
        "enclave_workers": args.workers,
        "tee": "sim",
        "images": len(images),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "load_average_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "note": "shared CPU cores: other processes may have been running (see the load average)",
    }
    report["confidential_stage_means_ms"] = _stage_means(metrics["confidential"])
    report["confidential_unverified_stage_means_ms"] = _stage_means(metrics["confidential_unverified"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def _stage_means(metrics: str) -> dict:
    import re

    sums = dict(re.findall(r'infenclave_stage_seconds_sum\{stage="(\w+)"\} ([0-9.]+)', metrics))
    counts = dict(re.findall(r'infenclave_stage_seconds_count\{stage="(\w+)"\} ([0-9]+)', metrics))
    return {s: round(float(sums[s]) / int(counts[s]) * 1e3, 2) for s in sums if int(counts.get(s, 0))}


if __name__ == "__main__":
    main()
