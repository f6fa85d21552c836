"""The attack work as seeded tasks: the same results in this process, in a process pool and on
Ray; an interrupted `infenclave assess` resumed to the same plan; a resume with other options
refused. Real Lite0, real photos, real processes, tiny budgets (the scheduling is under test,
not the attack's strength)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import CLI, ROOT, run_cli

CUT = "_blocks.2"
BUDGET = {"whitebox_steps": 2, "whitebox_restarts": 2}  # 9 photos: 2 batches x 2 restarts = 4 tasks


def nine_photos() -> dict[str, np.ndarray]:
    """The 8 built-in photos and one again under another name: two white-box batches (8 + 1)."""
    from infenclave.assess.attacks import load_eval_images

    photos = load_eval_images()
    photos["coffee-again"] = photos["coffee"]
    return photos


def attack(executor: object | None) -> object:
    from infenclave.assess.attacks import Budgets, Judge, run_attacks
    from infenclave.models import load_model
    from infenclave.network import analyse

    model = load_model("efficientnet-lite0")
    return run_attacks(
        model,
        analyse(model),
        [CUT],
        nine_photos(),
        budgets=Budgets(**BUDGET),
        judge=Judge.for_model(model),
        seed=5,
        threads=1,
        executor=executor,  # type: ignore[arg-type]
        stop_when_unsafe=False,  # every batch is judged: every figure is compared
    )


@pytest.fixture(scope="module")
def in_process():
    return attack(None)


def figures(results) -> list[dict]:
    return [{k: v for k, v in c.to_dict().items() if "seconds" not in k} for c in results.cuts]


def assert_same(a, b) -> None:
    """Bitwise the same reconstructions (uint8), verdicts and figures."""
    assert [c.cut for c in a.cuts] == [c.cut for c in b.cuts]
    for ca, cb in zip(a.cuts, b.cuts):
        assert [r.image for r in ca.images] == [r.image for r in cb.images]
        for ra, rb in zip(ca.images, cb.images):
            assert np.array_equal(ra.reconstruction, rb.reconstruction), ra.image
    assert figures(a) == figures(b)


def _close(x, y, tol: float, path: str = "") -> None:
    if isinstance(x, dict):
        assert set(x) == set(y), path
        for k in x:
            _close(x[k], y[k], tol, f"{path}.{k}")
    elif isinstance(x, list):
        assert len(x) == len(y), path
        for i, (u, v) in enumerate(zip(x, y)):
            _close(u, v, tol, f"{path}[{i}]")
    elif isinstance(x, float) and not isinstance(x, bool):
        assert y == pytest.approx(x, abs=tol), path
    else:
        assert x == y, path


def test_two_processes_give_what_one_gives(in_process) -> None:
    from infenclave.assess.attacks.tasks import LocalPool, running

    with running(LocalPool(2)) as pool:
        pooled = attack(pool)
    assert pooled.executor == {"executor": "process-pool", "workers": 2}
    assert in_process.executor["executor"] == "in-process"
    (cut,) = in_process.cuts
    assert len(cut.images) == 9 and [r["seed"] for r in cut.extra["restarts"]][:2] != [0, 0]
    assert_same(in_process, pooled)


def test_ray_in_a_network_namespace_gives_what_local_gives(in_process, tmp_path) -> None:
    """Ray (a private instance on 127.0.0.1) inside a fresh network namespace with only
    loopback up, so nothing can leave the machine; the results come back as files."""
    pytest.importorskip("ray")
    prefix = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]
    probe = subprocess.run([*prefix, "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no network namespace here: {probe.stderr.decode().strip()}")
    code = (
        "import json, sys, numpy as np\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_assess_tasks import attack, figures\n"
        "from infenclave.assess.attacks.tasks import RayExecutor, running\n"
        "if __name__ == '__main__':\n"
        "    with running(RayExecutor(workers=2)) as ex:\n"
        "        r = attack(ex)\n"
        "    np.save(sys.argv[1] + '/recon.npy', np.stack([i.reconstruction for c in r.cuts for i in c.images]))\n"
        "    open(sys.argv[1] + '/fig.json', 'w').write(json.dumps({'figures': figures(r), 'executor': r.executor}))\n"
    )
    script = tmp_path / "ray_run.py"
    script.write_text(code)
    shell = f"ip link set lo up && exec {sys.executable} {script} {tmp_path}"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT / "src"))
    res = subprocess.run([*prefix, "sh", "-c", shell], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((tmp_path / "fig.json").read_text())
    assert doc["executor"]["executor"] == "ray" and doc["executor"]["workers"] == 2
    recon = np.load(tmp_path / "recon.npy")
    local = np.stack([i.reconstruction for c in in_process.cuts for i in c.images])
    assert np.array_equal(recon, local)
    fa = figures(in_process)
    assert [c["unsafe"] for c in fa] == [c["unsafe"] for c in doc["figures"]]
    assert [c["evidence"] for c in fa] == [c["evidence"] for c in doc["figures"]]
    _close(json.loads(json.dumps(fa, default=str)), doc["figures"], 1e-6)


# --- interrupt and resume, as a user does -----------------------------------------------

VOLATILE = re.compile(r"seconds|_s$|per_s|runtime|executor|threads|created|stats|trials|elapsed")


def stable(doc):
    """A plan without what legitimately differs between two runs: timings and where it ran."""
    if isinstance(doc, dict):
        return {k: stable(v) for k, v in doc.items() if not VOLATILE.search(k)}
    if isinstance(doc, list):
        return [stable(v) for v in doc]
    return doc


def assess_args(photos: dict[str, Path], attack_dir: Path, out: Path, steps: int = 10, jobs: int = 1) -> list[str]:
    return [
        "assess",
        "efficientnet-lite0",
        "--images",
        str(photos["coffee"]),
        "--attack-images",
        str(attack_dir),
        "--whitebox-steps",
        str(steps),
        "--whitebox-restarts",
        "1",
        "--jobs",
        str(jobs),
        "--out",
        str(out),
    ]


@pytest.fixture(scope="module")
def attack_dir(photos, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("attack-photos")
    for name, path in photos.items():
        (folder / f"{name}{path.suffix}").write_bytes(path.read_bytes())
    flipped = folder / "coffee-again.png"  # a 9th photo: two white-box batches
    from PIL import Image

    Image.open(photos["coffee"]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(flipped)
    return folder


@pytest.fixture(scope="module")
def interrupted(photos, attack_dir, tmp_path_factory) -> tuple[Path, str]:
    """A real `infenclave assess` stopped by SIGINT once its first attack task is kept."""
    base = tmp_path_factory.mktemp("resume")
    out = base / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [*CLI, *assess_args(photos, attack_dir, out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # a test runner started in the background (no job control) ignores SIGINT, and the child
        # would inherit that: give it the default, so that Python turns SIGINT into Ctrl-C
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if list(base.glob(".out.*.incomplete/.partial/tasks/*.npz")):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before a task was kept"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    return out, stderr


def test_resume_with_other_settings_is_refused(interrupted, photos, attack_dir) -> None:
    out, _ = interrupted  # runs before the resume below, which finishes the folder
    res = run_cli(*assess_args(photos, attack_dir, out, steps=12), "--resume")
    assert res.returncode == 2, res.stderr
    assert "other settings" in res.stderr and "whitebox_steps" in res.stderr
    assert "Traceback" not in res.stderr
    assert (out / ".partial" / "state.json").is_file()  # nothing lost


def test_interrupted_then_resumed_gives_the_uninterrupted_plan(interrupted, photos, attack_dir, tmp_path) -> None:
    out, stderr = interrupted
    assert "PARTIAL" in stderr and "--resume" in stderr
    plan = json.loads((out / "plan.json").read_text())
    assert plan["scan"]["partial"] is True and plan["recommendation"]["verdict"] == "partial"
    state = json.loads((out / ".partial" / "state.json").read_text())
    assert state["settings"]["budgets"]["whitebox_steps"] == 10
    kept = sorted(p.name for p in (out / ".partial" / "tasks").glob("*.npz"))
    assert kept and not list((out / ".partial" / "tasks").glob(".*.tmp"))

    resumed = run_cli(*assess_args(photos, attack_dir, out), "--resume", timeout=600)
    assert resumed.returncode == 4, resumed.stderr  # 9 photos: not enough evidence
    assert f"resuming: {len(kept)} finished attack task(s)" in resumed.stderr
    assert not (out / ".partial").exists()  # finished: nothing left to resume

    fresh = run_cli(*assess_args(photos, attack_dir, tmp_path / "fresh", jobs=2), timeout=600)  # and in parallel
    assert fresh.returncode == 4, fresh.stderr
    a = json.loads((out / "plan.json").read_text())
    b = json.loads((tmp_path / "fresh" / "plan.json").read_text())
    assert a["adversary"]["attacked_cuts"] and a["recommendation"] == b["recommendation"]
    assert stable(a) == stable(b)


def test_resume_needs_an_interrupted_assessment(tmp_path, photos, attack_dir) -> None:
    res = run_cli(*assess_args(photos, attack_dir, tmp_path / "none"), "--resume")
    assert res.returncode == 2 and "nothing to resume" in res.stderr, res.stderr
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "plan.json").write_text("{}")
    res = run_cli(*assess_args(photos, attack_dir, tmp_path / "done"), "--resume")
    assert res.returncode == 2 and "finished assessment" in res.stderr, res.stderr


def test_ray_missing_is_a_clear_usage_error(tmp_path, photos) -> None:
    """Without the `ray` extra, --ray is refused in one line (exit 2) before any work."""
    code = "import sys; sys.modules['ray'] = None; from infenclave.cli import main; sys.argv[0] = 'infenclave'; main()"
    res = subprocess.run(
        [sys.executable, "-c", code, "assess", "efficientnet-lite0", "--ray", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr
    assert "infenclave[ray]" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()
