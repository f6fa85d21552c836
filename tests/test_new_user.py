"""What a new user meets first: --version and -h, help that renders flags as flags, one exit
code table, serve refusing bad options before anything starts, liveness and readiness probes,
an OpenAPI document another language can call the sealed endpoints from, metrics and logs.

Real processes and sockets: the CLI as a subprocess, one sim server (one worker, Lite0) on a
free 127.0.0.1 port, stopped at the end of the module.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import httpx
import pytest

import infenclave
from conftest import run_cli
from test_serving_support import ServerProcess, free_port, make_bundle, sim_client

MODEL = "efficientnet-lite0"


@pytest.fixture(scope="module")
def bundle():
    return make_bundle(MODEL)


@pytest.fixture(scope="module")
def server(bundle):
    proc = ServerProcess(bundle.bundle, workers=1, extra=("--log-format", "json"))
    yield proc
    proc.stop()


def test_version_and_short_help() -> None:
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"infenclave {infenclave.__version__}"
    for args in (["-h"], ["predict", "-h"], ["classify", "--help"]):
        out = run_cli(*args)
        assert out.returncode == 0 and "Usage:" in out.stdout, out.stderr
    assert "Exit codes" in run_cli("-h").stdout


def test_flags_render_as_flags() -> None:
    text = run_cli("classify", "-h").stdout
    assert "--json" in text and "<bool>" not in text
    assert "--allow-simulation" in text
    # A flag takes no value: in `--json true`, `true` is the next argument (here the MODEL).
    out = run_cli("inspect", "--json", "true")
    assert out.returncode == 2 and "'true'" in out.stderr, out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--log-level", "verbose"], "--log-level must be one of"),
        (["--log-format", "xml"], "--log-format must be"),
        (["--device", "cuda"], "no CUDA provider"),
    ],
)
def test_serve_refuses_bad_options_in_one_line(bundle, args: list[str], message: str) -> None:
    import onnxruntime

    if args[0] == "--device" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this build has CUDA")
    out = run_cli("serve", str(bundle.bundle), "--port", str(free_port()), *args, timeout=60)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr


def test_serve_port_in_use_fails_before_any_worker_starts(bundle, tmp_path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run_cli("serve", str(bundle.bundle), "--port", str(port), "--state", str(tmp_path / "state"), timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert not (tmp_path / "state").exists()  # nothing started


def test_assess_unsafe_verdict_exits_4(photos, tmp_path) -> None:
    # The Tail starts at the stem: whatever cut is safe, no BackNet can remain -> no safe cut.
    out = run_cli(
        "assess",
        MODEL,
        "--adversary",
        "passive",
        "--images",
        str(photos["flower"]),
        "--tail-start",
        "_conv_stem",
        "--out",
        str(tmp_path / "a"),
    )
    assert out.returncode == 4, out.stderr  # ExitCode.UNSAFE; plan and report still written
    assert "error: no-safe-cut:" in out.stderr
    assert (tmp_path / "a" / "plan.json").is_file() and (tmp_path / "a" / "report.html").is_file()
    assert 'id="whole-model"' in (tmp_path / "a" / "report.html").read_text()  # and what it costs
    # partition reads that plan with the assessment's reader and follows it, saying why: the
    # whole model in the enclave.
    whole = run_cli("partition", MODEL, "--plan", str(tmp_path / "a" / "plan.json"), "--out", str(tmp_path / "b"))
    assert whole.returncode == 0, whole.stderr
    assert "no-safe-cut: the whole model in the enclave" in whole.stdout and "no BackNet" in whole.stdout
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["manifest.json", "manifest.sig", "model.bin.enc"]
    # Half a split on top of that plan is refused; both cut points choose a split anyway.
    half = run_cli(
        "partition",
        MODEL,
        "--plan",
        str(tmp_path / "a" / "plan.json"),
        "--front-end",
        "_blocks.3",
        "--out",
        str(tmp_path / "c"),
    )
    assert half.returncode == 2 and "recommends the whole model in the enclave" in half.stderr
    assert not (tmp_path / "c").exists()


def test_liveness_and_readiness(server, bundle) -> None:
    for path in ("/livez", "/v2/health/live"):
        assert httpx.get(server.url + path).status_code == 200
    for path in ("/readyz", "/v2/health/ready"):
        answer = httpx.get(server.url + path)
        assert answer.status_code == 503, answer.text  # up, but no worker holds the model key
        assert answer.json()["ready"] is False and answer.json()["workers"] == 1
        assert "reprovision_needed" in answer.json()
    owner = sim_client(server.url, bundle.policy)
    owner.provision(bundle.key)
    owner.close()
    for path in ("/readyz", "/v2/health/ready"):
        answer = httpx.get(server.url + path)
        assert answer.status_code == 200 and answer.json()["workers_ready"] == 1


def test_openapi_declares_the_sealed_bodies_and_headers(server) -> None:
    schema = httpx.get(server.url + "/openapi.json").json()
    assert schema["openapi"].startswith("3.1")
    for path, headers in (
        ("/v1/classify", {"X-Infenclave-Enclave-Key", "X-Infenclave-Request-Id", "X-Infenclave-Model"}),
        ("/v1/provision", {"X-Infenclave-Enclave-Key"}),
    ):
        operation = schema["paths"][path]["post"]
        body = operation["requestBody"]
        assert body["required"] and set(body["content"]) == {"application/octet-stream"}
        assert {p["name"] for p in operation["parameters"] if p["in"] == "header"} == headers
        assert {"400", "409", "503"} <= set(operation["responses"])
    assert {"/livez", "/readyz", "/v2/health/live", "/v2/health/ready"} <= set(schema["paths"])


def test_metrics_and_logs(server, bundle, photos) -> None:
    client = sim_client(server.url, bundle.policy)
    client.classify(photos["coffee"])
    client.close()
    httpx.get(server.url + "/no/such/path")
    text = httpx.get(server.url + "/metrics").text
    info = f'deployment="partitioned",model_id="{bundle.model_id}",tee="sim",version="{infenclave.__version__}"'
    assert f"infenclave_info{{{info}}} 1" in text
    assert "infenclave_requests_in_flight 1" in text  # this very request
    assert 'infenclave_requests_total{endpoint="classify",outcome="ok",code="200"} 1' in text
    assert 'infenclave_requests_total{endpoint="other",outcome="error",code="404"} 1' in text
    assert 'infenclave_request_seconds_count{endpoint="classify"} 1' in text
    assert 'stage="total"' not in text
    # --log-format json: every line the server and its enclave worker wrote is one object.
    lines = [line for line in server.log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    assert {"infenclave.host", "infenclave.enclave", "uvicorn.access"} <= {r["logger"] for r in records}
    assert all(set(r) >= {"time", "level", "logger", "message"} for r in records)


def test_exit_code_table_is_in_the_readme() -> None:
    from pathlib import Path

    from infenclave.errors import ExitCode

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    for code in ExitCode:
        assert f"| {int(code)} |" in section, code


def test_cli_module_runs_as_a_script() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "infenclave.cli", "--version"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout.startswith("infenclave ")
