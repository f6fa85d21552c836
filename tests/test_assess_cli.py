"""`infenclave assess` as a user runs it: real subprocesses, real files, a real browser."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CLI, run_cli

OUTPUTS = {"plan.json", "exposure.csv", "report.html"}


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def assessed(tmp_path_factory, photos) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("assess") / "out"
    res = run_cli(
        "assess",
        "efficientnet-lite0",
        "--adversary",
        "passive",
        "--images",
        str(photos["coffee"]),
        str(photos["flower"]),
        "--out",
        str(out),
    )
    return out, res


def test_assess_writes_plan_csv_and_report(assessed) -> None:
    out, res = assessed
    assert res.returncode == 0, res.stderr
    assert {p.name for p in out.iterdir()} == OUTPUTS
    assert "FrontNet end  _blocks.3" in res.stdout and "Tail start    _conv_head" in res.stdout
    plan = json.loads((out / "plan.json").read_text())
    assert plan["recommendation"]["front_end"] == "_blocks.3"
    assert plan["scan"]["mode"] == "early-stop" and plan["scan"]["partial"] is False
    assert [i["source"] for i in plan["images"]][0].endswith("coffee.png")
    rows = list(csv.DictReader(io.StringIO((out / "exposure.csv").read_text())))
    assert len(rows) == len(plan["cuts"]) * 2
    assert "channel images" in res.stderr  # the progress bar
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_existing_out_is_refused_then_replaced_with_force(assessed, photos, tmp_path) -> None:
    first_out, first = assessed
    assert first.returncode == 0, first.stderr
    out = tmp_path / "out"
    shutil.copytree(first_out, out)  # the module's assessment stays for the browser test
    before = (out / "plan.json").read_text()
    t0 = time.monotonic()
    res = run_cli(
        "assess", "efficientnet-lite0", "--adversary", "passive", "--images", str(photos["flower"]), "--out", str(out)
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"error: {out} already exists; choose another --out or add --force to replace it"
    ]
    assert time.monotonic() - t0 < 30  # refused before any model work
    assert (out / "plan.json").read_text() == before
    res = run_cli(
        "assess",
        "efficientnet-lite0",
        "--adversary",
        "passive",
        "--images",
        str(photos["flower"]),
        "--out",
        str(out),
        "--force",
    )
    assert res.returncode == 0, res.stderr
    plan = json.loads((out / "plan.json").read_text())
    assert [i["name"] for i in plan["images"]] == ["flower"]
    assert plan["recommendation"]["front_end"] == "_blocks.1"


def test_force_never_deletes_a_folder_that_is_not_an_assessment(tmp_path, photos) -> None:
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    res = run_cli(
        "assess",
        "efficientnet-lite0",
        "--adversary",
        "passive",
        "--images",
        str(photos["flower"]),
        "--out",
        str(precious),
        "--force",
    )
    assert res.returncode == 2 and "does not look like an earlier assessment" in res.stderr
    assert (precious / "thesis.tex").read_text() == "years of work"


def _not_an_image(d: Path) -> list[str]:
    (d / "x.png").write_bytes(b"\x89PNG but not really")
    return [str(d / "x.png")]


def _empty_folder(d: Path) -> list[str]:
    (d / "empty").mkdir()
    return [str(d / "empty")]


def _missing(d: Path) -> list[str]:
    return [str(d / "nope.jpg")]


@pytest.mark.parametrize(
    "make, message",
    [
        (_not_an_image, "x.png: not a recognised image file"),
        (_empty_folder, "no image files in this folder"),
        (_missing, "nope.jpg: no such file or folder"),
    ],
)
def test_bad_images_exit_2_with_one_line(tmp_path, make, message) -> None:
    args = make(tmp_path)
    res = run_cli(
        "assess", "efficientnet-lite0", "--adversary", "passive", "--images", *args, "--out", str(tmp_path / "o")
    )
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert not (tmp_path / "o").exists()


def test_other_bad_options_exit_2(tmp_path, photos) -> None:
    res = run_cli(
        "assess", "efficientnet-lite0", "--adversary", "passive", str(photos["flower"]), "--out", str(tmp_path / "o")
    )
    assert res.returncode == 2 and "images go after --images" in res.stderr
    res = run_cli(
        "assess",
        "efficientnet-lite0",
        "--adversary",
        "passive",
        "--images",
        str(photos["flower"]),
        "--tail-start",
        "_blocks.99",
        "--out",
        str(tmp_path / "o"),
    )
    assert res.returncode == 2 and "unknown cut point '_blocks.99'" in res.stderr
    res = run_cli(
        "assess",
        "efficientnet-lite0",
        "--adversary",
        "passive",
        "--images",
        str(photos["flower"]),
        "--oracle",
        "efficientnet-lite2",
        "--out",
        str(tmp_path / "o"),
    )
    assert res.returncode == 2 and "same input size" in res.stderr
    assert not (tmp_path / "o").exists()


def test_ctrl_c_writes_a_partial_plan(tmp_path, photos) -> None:
    out = tmp_path / "partial"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [
            *CLI,
            "assess",
            "efficientnet-lite0",
            "--adversary",
            "passive",
            "--images",
            str(photos["rocket"]),
            "--full",
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    for line in proc.stderr:  # wait until the oracle loop runs
        if line.startswith("scanning"):
            break
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    stderr = proc.stderr.read()
    assert proc.returncode == 130, stderr
    assert "PARTIAL" in stderr
    plan = json.loads((out / "plan.json").read_text())
    assert plan["scan"]["partial"] is True and plan["scan"]["mode"] == "full"
    # where the interrupt lands depends on the machine's speed: some cut point is undecided
    assert {"incomplete", "not-scanned"} & {c["status"] for c in plan["cuts"]}
    assert any("interrupted" in w for w in plan["warnings"])
    assert "Partial assessment" in (out / "report.html").read_text()


@pytest.mark.skipif(chromium() is None, reason="chromium is not installed (scripts/system-deps.sh installs it as root)")
def test_report_renders_in_a_headless_browser_with_every_figure(assessed, tmp_path) -> None:
    from PIL import Image

    out, res = assessed
    assert res.returncode == 0, res.stderr
    url = (out / "report.html").resolve().as_uri()
    browser = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--virtual-time-budget=10000",
    ]
    dom = subprocess.run([*browser, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body, dom.stdout[:500]
    figures = int(re.search(r'data-figures="(\d+)"', body.group(0)).group(1))
    assert figures == 2 + 4 * 2  # KL profile, cost, mosaics at 4 cut points for 2 photos
    # the page's own check: every <img> complete with a natural width in this browser
    assert f'data-images-decoded="{figures}/{figures}"' in body.group(0)
    uris = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', dom.stdout)
    assert len(uris) == figures
    for u in uris:
        assert base64.b64decode(u)[:8] == b"\x89PNG\r\n\x1a\n"

    shot = tmp_path / "report.png"
    run = subprocess.run(
        [*browser, f"--screenshot={shot}", "--window-size=1200,3000", url], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 3000)
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 1000  # text, plots and photos, not a blank page
    # the KL profile plot sits in the first screen: its region must not be uniform
    top = img.crop((0, 500, 1200, 1500)).convert("L")
    lo, hi = top.getextrema()
    assert hi - lo > 200


def test_help_documents_the_options() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "infenclave.cli", "assess", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, COLUMNS="120"),
    )
    assert res.returncode == 0
    for opt in ("--images", "--out", "--oracle", "--full", "--tail-start", "--seed", "--force"):
        assert opt in res.stdout
