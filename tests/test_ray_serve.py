"""infenclave on Ray Serve (`infenclave.host.ray_serve`), end to end, loopback only.

One scenario (`tests/ray_scenario.py`) runs inside a new network namespace (``unshare -n``,
loopback up): a Ray cluster on 127.0.0.1 without dashboard or Ray Client, Serve's HTTP proxy
on 127.0.0.1, two key servers, real enclave programs, the real client. The tests read what it
saw: confidential top-5 equal to plain top-5 through Ray, every listening socket of the Ray
process tree on loopback, an enclave replica killed under load replaced and serving again
with a key from the key server (no owner), and a key server that pins another measurement
refusing the replica, which then never becomes ready. About 60 s on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from test_serving_support import make_bundle, plain_predictor

MODEL = "efficientnet-lite0"
PHOTOS = ["coffee", "chelsea", "astronaut", "rocket"]
SCENARIO = Path(__file__).with_name("ray_scenario.py")
#: The whole scenario's deadline; its steps have their own.
TIMEOUT_S = 240
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _netns_command() -> list[str] | None:
    """``unshare`` into a new network namespace with loopback up, or None where it cannot."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return None
    base = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]
    probe = subprocess.run([*base, "sh", "-c", "ip link set lo up"], capture_output=True, timeout=30)
    return base if probe.returncode == 0 else None


@pytest.fixture(scope="module")
def scenario(photos) -> dict:
    netns = _netns_command()
    if netns is None:
        pytest.skip("cannot create a network namespace here (unshare -n / -rn refused)")
    bundle = make_bundle(MODEL)
    work = Path(tempfile.mkdtemp(prefix="infenclave-ray-"))
    args = {
        "bundle": str(bundle.bundle),
        "key": str(bundle.key),
        "policy": str(bundle.policy),
        "images": [str(photos[n]) for n in PHOTOS],
        "work": str(work / "run"),
    }
    (work / "args.json").write_text(json.dumps(args))
    out = work / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    script = f'ip link set lo up && exec "{sys.executable}" "{SCENARIO}" "{work / "args.json"}" "{out}"'
    process = subprocess.Popen(
        [*netns, "sh", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # its own process group: killed whole on timeout
    )
    try:
        log, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        log, _ = process.communicate()
        pytest.fail(f"the Ray scenario ran over {TIMEOUT_S} s:\n{log.decode(errors='replace')[-6000:]}")
    try:
        result = json.loads(out.read_text())
    except (OSError, ValueError):
        pytest.fail(f"the Ray scenario wrote no result:\n{log.decode(errors='replace')[-6000:]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert "error" not in result, result["error"] + log.decode(errors="replace")[-3000:]
    print("\nray scenario steps (s):", result["steps"])
    return result


@pytest.fixture(scope="module")
def plain(photos) -> list[list[tuple[int, float]]]:
    predictor = plain_predictor(MODEL)
    return [[(p.index, p.prob) for p in predictor.predict(photos[n].read_bytes(), 5)] for n in PHOTOS]


def test_confidential_top5_through_ray_equals_plain_and_stays_on_loopback(scenario, plain) -> None:
    assert len(scenario["attested"]) == 2 and scenario["attested_tee"] == ["simulated"]
    assert scenario["top5"] == [[i for i, _ in row] for row in plain]
    for got, want in zip(scenario["probs"], plain):
        assert all(math.isclose(g, w, abs_tol=1e-4) for g, (_, w) in zip(got, want))
    assert scenario["readyz"]["ready"] and scenario["readyz"]["workers_ready"] == 2
    # Both enclave replicas got the key from the key server: released, to their own keys.
    released = {e["enclave_key"] for e in scenario["audit"] if e["outcome"] == "released"}
    assert set(scenario["attested"]) <= released
    # Every listening socket of the Ray process tree (GCS, raylet, workers, Serve's proxy and
    # replicas) is on loopback; the cluster really is a tree of many processes.
    assert scenario["tree_size"] >= 8, scenario["tree_size"]
    assert len(scenario["listening"]) >= 8, scenario["listening"]
    outside = [s for s in scenario["listening"] if s["address"] not in LOOPBACK]
    assert not outside, outside
    assert scenario["left_over"] == []  # nothing outlives the scenario


def test_a_killed_enclave_replica_is_replaced_and_serves_again_without_the_owner(scenario, plain) -> None:
    assert scenario["replaced_s"] is not None, "no replacement replica registered"
    assert not scenario["victim_alive"] and not scenario["victim_enclave_alive"]
    new_key = scenario["replacement"]["key_id"]
    assert new_key not in scenario["attested"] and new_key != scenario["victim_key"]
    # The replacement's key came from the key server, attested: no owner involved.
    assert any(e["outcome"] == "released" and e["enclave_key"] == new_key for e in scenario["audit"])
    assert scenario["replacement"]["key_release_s"] > 0
    # Under load: requests in flight on the killed replica were retried by the client.
    assert scenario["load"]["ok"] > scenario["load"]["ok_before_kill"] > 0
    assert scenario["load_errors"] == []
    assert new_key in scenario["attested_after"] and scenario["victim_key"] not in scenario["attested_after"]
    assert scenario["top5_after"] == [[i for i, _ in row] for row in plain] * 2


def test_the_key_server_refuses_a_replica_with_another_measurement(scenario) -> None:
    assert scenario["wrong_deployed"] is False, scenario.get("wrong_status")
    assert scenario["wrong_status"] == "ApplicationStatus.DEPLOY_FAILED"
    assert scenario["wrong_registered"] == []  # no replica of it ever became ready
    refused = [e for e in scenario["audit_wrong"] if e["outcome"] == "refused"]
    assert refused and all("step 3e (measurement)" in e["step"] for e in refused), scenario["audit_wrong"]
    assert not [e for e in scenario["audit_wrong"] if e["outcome"] == "released"]


def _run_in_netns(args: dict, timeout: float) -> dict:
    netns = _netns_command()
    if netns is None:
        pytest.skip("cannot create a network namespace here (unshare -n / -rn refused)")
    work = Path(tempfile.mkdtemp(prefix="infenclave-ray-cli-"))
    try:
        (work / "args.json").write_text(json.dumps({**args, "work": str(work / "run")}))
        out = work / "result.json"
        script = f'ip link set lo up && exec "{sys.executable}" "{SCENARIO}" "{work / "args.json"}" "{out}"'
        process = subprocess.Popen(
            [*netns, "sh", "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
            start_new_session=True,
        )
        try:
            log, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            log, _ = process.communicate()
            pytest.fail(f"ran over {timeout} s:\n{log.decode(errors='replace')[-6000:]}")
        if not out.exists():
            pytest.fail(f"no result:\n{log.decode(errors='replace')[-6000:]}")
        return json.loads(out.read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_serve_ray_command_starts_a_loopback_cluster_serves_and_stops_on_ctrl_c(photos, plain) -> None:
    bundle = make_bundle(MODEL)
    args = {
        "mode": "cli",
        "bundle": str(bundle.bundle),
        "key": str(bundle.key),
        "policy": str(bundle.policy),
        "images": [str(photos[PHOTOS[0]])],
    }
    result = _run_in_netns(args, 200)
    assert "error" not in result, result["error"] + result.get("log_tail", "")
    assert result["top5"] == [[i for i, _ in plain[0]]]
    assert result["tree_size"] >= 8 and len(result["listening"]) >= 8
    assert not [s for s in result["listening"] if s["address"] not in LOOPBACK], result["listening"]
    assert result["exit_code"] == 0 and result["left_over"] == [], result["log_tail"]


def test_serve_ray_without_the_extra_says_what_to_install(tmp_path: Path) -> None:
    """Ray missing (an import that fails, as without infenclave[ray]): one clear line, exit 2."""
    fake = tmp_path / "no-ray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    bundle = make_bundle(MODEL)
    env = dict(os.environ, PYTHONPATH=f"{fake.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    command = [sys.executable, "-m", "infenclave.cli", "serve", str(bundle.bundle), "--ray"]
    done = subprocess.run(
        [*command, "--keyserver", "http://127.0.0.1:9"], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert "install infenclave[ray]" in done.stderr and "Traceback" not in done.stderr
    # With Ray, a missing key server is refused before anything starts.
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--ray needs --keyserver" in done.stderr, done.stderr
