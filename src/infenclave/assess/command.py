"""`infenclave assess` as a library call: check inputs, scan, write plan, CSV and report.

Order matters for the user: everything that can be refused cheaply (output folder, images,
oracle, --tail-start) is checked before the minutes of oracle work. Outputs are written into a
hidden temporary folder next to `--out` and renamed into place at the end, so a folder named
`--out` is always a finished assessment (possibly a *partial* one after Ctrl-C, which says so
in the plan and the report) and never a half-written one.

The attack work runs as tasks (`attacks.tasks`): `--jobs` processes side by side, or Ray
tasks with `--ray`. Each finished task is kept in `OUT/.partial/tasks/` of an interrupted
assessment, beside `OUT/.partial/state.json` (what the run was asked to do); `--resume` checks
that the same assessment is asked for again, refuses otherwise, and runs only the missing
tasks. A finished assessment drops `.partial`.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infenclave.assess.images import load_images
from infenclave.assess.kl import make_oracle
from infenclave.assess.plan import build_plan, default_tail_start, exposure_csv
from infenclave.assess.report import ReportInputs, render_report
from infenclave.assess.runtime import RuntimeConfig
from infenclave.assess.scan import Mode, ProgressFn, ScanResult, scan
from infenclave.errors import AssessmentError, UsageError

DEFAULT_OUT = Path("assessment")
OUTPUT_FILES = ("plan.json", "exposure.csv", "report.html")
PARTIAL_DIR = ".partial"  # in an interrupted assessment's folder: state.json and tasks/
STATE_FORMAT = 1


@dataclass
class AssessOptions:
    """The `assess` command's options (see `infenclave assess --help`)."""

    model: str
    images: list[Path] | None = None  # None: the built-in photos
    out: Path = DEFAULT_OUT
    oracle: str | None = None  # None: the model itself
    full: bool = False
    tail_start: str | None = None  # None: the last feature-map cut point
    seed: int = 0
    force: bool = False
    runtime: RuntimeConfig | None = None  # None: choose by measurement (tests and bench pin it)
    adversary: str = "knows-weights"  # the strongest that applies; see assess/adversary.py
    judge: str | None = None  # None: a different zoo model than the one assessed
    whitebox_steps: int | None = None  # None: the attack's default budget (a cap per restart)
    decoder_epochs: int | None = None
    whitebox_restarts: int | None = None
    attack_images: list[Path] | None = None  # None: the offline evaluation set (photosets.py)
    max_recovery: float = 0.10  # attacks.evidence.DEFAULT_MAX_RECOVERY
    jobs: int | None = None  # attack processes; None: the cores this process may use; 1: in-process
    ray: bool = False  # attack tasks on Ray (a private local instance unless ray_address)
    ray_address: str | None = None
    resume: bool = False  # continue the interrupted assessment in `out`


@dataclass
class AssessOutcome:
    out: Path
    plan: dict[str, Any]
    result: ScanResult
    seconds: float

    @property
    def partial(self) -> bool:
        return bool(self.plan["scan"]["partial"])


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse an existing `--out` unless --force, and even then only a previous assessment.

    `--force` deletes the old folder; a typo such as `--out ~` must not delete a home folder,
    so only an empty folder or one holding a plan.json is replaced.
    """
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise UsageError(f"{out} already exists; choose another --out or add --force to replace it")
    if out.is_symlink() or not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder; refusing to replace it")
    if any(out.iterdir()) and not (out / "plan.json").is_file():
        raise UsageError(
            f"refusing to replace {out}: it is not empty and holds no plan.json, "
            "so it does not look like an earlier assessment"
        )


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A temporary folder next to `out`, removed on any failure (and on Ctrl-C)."""
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".{out.name}.{secrets.token_hex(6)}.incomplete"
        tmp.mkdir()  # not mkdtemp: the result should get the user's usual permissions
    except OSError as exc:
        raise UsageError(f"cannot create the output folder next to {out}: {exc.strerror}") from exc
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a successful publish


def publish(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished folder into place; with --force the old one goes only after."""
    old: Path | None = None
    if out.exists():
        check_out_dir(out, force)  # it may have appeared during the scan
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.absolute().parent))
        old.rmdir()
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError as exc:
        if old is not None:
            old.rename(out)
        raise UsageError(f"cannot write {out}: {exc.strerror}") from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_resume(out: Path) -> dict[str, Any]:
    """The saved state of the interrupted assessment in `out`, or a clear refusal."""
    import json

    state = out / PARTIAL_DIR / "state.json"
    if not out.is_dir():
        raise UsageError(f"--resume: {out} does not exist; there is nothing to resume")
    if not state.is_file():
        if (out / "plan.json").is_file():
            raise UsageError(
                f"--resume: {out} holds a finished assessment (no {PARTIAL_DIR}/ state); "
                "there is nothing to resume (use --force to run it again)"
            )
        raise UsageError(f"--resume: {out} holds no interrupted assessment ({PARTIAL_DIR}/state.json is missing)")
    try:
        doc = json.loads(state.read_text(encoding="utf-8"))
        if doc.get("format") != STATE_FORMAT or not isinstance(doc.get("settings"), dict):
            raise ValueError("unknown format")
    except (OSError, ValueError) as exc:
        raise UsageError(f"--resume: cannot read {state}: {exc}") from exc
    return dict(doc["settings"])


def run_settings(
    opts: AssessOptions,
    model: Any,
    oracle_model: Any,
    decoded: list[Any],
    attack_decoded: list[Any] | None,
    budgets: Any,
) -> dict[str, Any]:
    """What determines an assessment's result (never where it runs: --jobs, --ray, --out)."""
    from infenclave import __version__

    return {
        "infenclave": __version__,
        "model": opts.model,
        "model_sha256": model.weights_sha256,
        "oracle": opts.oracle,
        "oracle_sha256": oracle_model.weights_sha256 if oracle_model is not None else None,
        "images": [d.sha256 for d in decoded],
        "attack_images": [d.sha256 for d in attack_decoded] if attack_decoded else None,
        "full": opts.full,
        "tail_start": opts.tail_start,
        "seed": opts.seed,
        "adversary": opts.adversary,
        "judge": opts.judge,
        "budgets": budgets.to_dict(),
        "max_recovery": opts.max_recovery,
    }


def _refuse_other_settings(out: Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    diff = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diff:
        shown = ", ".join(
            f"{k}: {_short(saved.get(k))} -> {_short(now.get(k))}" if k not in ("images", "attack_images") else k
            for k in diff
        )
        raise UsageError(
            f"--resume: {out} was started with other settings ({shown}); "
            "resume with the same options, or start a new assessment with another --out"
        )


def _short(v: Any) -> str:
    text = str(v)
    return text if len(text) <= 40 else text[:37] + "..."


def run_assess(
    opts: AssessOptions, *, progress: ProgressFn | None = None, log: Callable[[str], None] | None = None
) -> AssessOutcome:
    """Run an assessment and write plan.json, exposure.csv and report.html to `opts.out`."""
    from infenclave.assess.attacks import Budgets, attacks_for
    from infenclave.assess.attacks.tasks import make_executor, running
    from infenclave.models import load_model
    from infenclave.network import analyse

    say = log or (lambda _msg: None)
    t0 = time.perf_counter()
    saved = check_resume(opts.out) if opts.resume else None
    if not opts.resume:
        check_out_dir(opts.out, opts.force)
    executor = make_executor(opts.jobs, ray=opts.ray, ray_address=opts.ray_address)  # refuse before work
    from infenclave.assess.attacks.evidence import check_max_recovery

    attacks_for(opts.adversary)  # refuse an unknown adversary before any work
    check_max_recovery(opts.max_recovery)
    defaults = Budgets()
    budgets = Budgets(
        whitebox_steps=opts.whitebox_steps or defaults.whitebox_steps,
        decoder_epochs=opts.decoder_epochs or defaults.decoder_epochs,
        whitebox_restarts=opts.whitebox_restarts or defaults.whitebox_restarts,
    )
    decoded = load_images(opts.images)  # every image decoded before any model work
    attack_decoded = load_images(opts.attack_images) if opts.attack_images else None
    say(f"loading {opts.model}")
    model = load_model(opts.model)
    oracle_model = load_model(opts.oracle) if opts.oracle else None
    oracle = make_oracle(model, oracle_model)
    net = analyse(model)
    if not any(c.is_feature_map for c in net.cuts):
        raise AssessmentError(
            f"{model.name}: no cut point has a (C, H, W) feature map; the KL-oracle method cannot assess this model"
        )
    if opts.tail_start is not None:
        tail, tail_source = net.cut(opts.tail_start), "option"
    else:
        tail, tail_source = default_tail_start(net), "default"
    images = [d.fitted(model.preprocess) for d in decoded]
    settings = run_settings(opts, model, oracle_model, decoded, attack_decoded, budgets)
    if saved is not None:
        _refuse_other_settings(opts.out, saved, settings)
    with staged_dir(opts.out) as tmp:
        store = _partial_state(tmp, opts.out if opts.resume else None, settings)
        if opts.resume:
            say(f"resuming: {len(store)} finished attack task(s) kept in {opts.out / PARTIAL_DIR}")
        mode: Mode = "full" if opts.full else "early-stop"
        n_maps = sum(1 for c in net.cuts if c.is_feature_map)
        say(f"scanning {n_maps} feature-map cut points of {model.name} with {len(images)} image(s), {mode} mode")
        result = scan(net, oracle, images, mode=mode, seed=opts.seed, runtime=opts.runtime, progress=progress)
        verdict = None
        leakage = None
        try:
            if not result.partial:
                with running(executor):
                    verdict = _attack(
                        opts, model, net, result, oracle, attack_decoded, tail, budgets, executor, store, say, progress
                    )
            if verdict is not None and verdict.attacks:
                leakage = _leakage(opts, net, tail, verdict, say)
        except KeyboardInterrupt:
            result.partial = True  # the scan is done; the attacks are not: a partial plan
            verdict, leakage = None, None
            say(
                f"interrupted: {len(store)} finished attack task(s) are kept; "
                f"run the same command with --resume to continue"
            )
        plan = build_plan(
            result,
            net,
            oracle,
            tail_start=tail,
            tail_start_source=tail_source,
            adversary=verdict,
            label_leakage=leakage,
        )
        say("writing plan, CSV and report")
        if not result.partial:
            shutil.rmtree(tmp / PARTIAL_DIR, ignore_errors=True)  # finished: nothing to resume
        _write(tmp, plan, result, verdict)
        publish(tmp, opts.out, opts.force or opts.resume)
    return AssessOutcome(out=opts.out, plan=plan, result=result, seconds=time.perf_counter() - t0)


def _partial_state(tmp: Path, resume_from: Path | None, settings: dict[str, Any]) -> Any:
    """`.partial/` in the staging folder: the settings, and the task results of the run being
    resumed (copied, so that the old folder stays whole until the new one replaces it)."""
    import json

    from infenclave.assess.attacks.tasks import TaskStore

    partial = tmp / PARTIAL_DIR
    if resume_from is not None and (resume_from / PARTIAL_DIR / "tasks").is_dir():
        shutil.copytree(resume_from / PARTIAL_DIR / "tasks", partial / "tasks")
    partial.mkdir(exist_ok=True)
    doc = {"format": STATE_FORMAT, "settings": settings}
    (partial / "state.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return TaskStore(partial / "tasks")


def _attack(
    opts: AssessOptions,
    model: Any,
    net: Any,
    result: ScanResult,
    oracle: Any,
    attack_decoded: Any,
    tail: Any,
    budgets: Any,
    executor: Any,
    store: Any,
    say: Callable[[str], None],
    progress: ProgressFn | None,
) -> Any:
    from infenclave.assess.adversary import assess_adversary, public_surrogate
    from infenclave.assess.attacks.runner import ProgressEvent

    surrogate = public_surrogate(model, net) if opts.adversary == "surrogate-weights" else None
    if opts.adversary in ("knows-weights", "surrogate-weights", "chosen-inputs"):
        say(f"attack tasks: {executor.name}, {executor.workers} at a time")

    def attack_progress(ev: ProgressEvent) -> None:
        # The bar's ETA is the running cut's; "cut i/N" bounds what is left (early stops end sooner).
        if progress is not None:
            progress(ev.done, ev.total, f"{ev.attack} @ {ev.cut}, cut {ev.cut_number}/{ev.cuts_total}: {ev.unit}")

    return assess_adversary(
        model,
        net,
        result,
        oracle,
        {d.name: d.rgb for d in attack_decoded} if attack_decoded else None,
        adversary=opts.adversary,
        tail=tail,
        full=opts.full,
        budgets=budgets,
        judge=opts.judge,
        seed=opts.seed,
        say=say,
        max_recovery=opts.max_recovery,
        surrogate=surrogate,
        progress=attack_progress if progress else None,
        executor=executor,
        store=store,
    )


def _leakage(opts: AssessOptions, net: Any, tail: Any, verdict: Any, say: Callable[[str], None]) -> Any:
    from infenclave.assess import label_leakage

    say("measuring label leakage from IR2 at the candidate Tail starts")
    maps = [c.name for c in net.cuts if c.is_feature_map]
    starts = list(dict.fromkeys([*maps[-label_leakage.CANDIDATE_TAIL_STARTS :], tail.name]))
    return label_leakage.measure(
        net,
        verdict.eval_photos,
        verdict.training_photos,
        tail_starts=starts,
        public_head=opts.adversary in ("knows-weights", "surrogate-weights"),
        seed=opts.seed,
    )


def _write(folder: Path, plan: dict[str, Any], result: ScanResult, verdict: Any = None) -> None:
    import json

    from infenclave.assess.adversary import attack_figures

    (folder / "plan.json").write_text(json.dumps(plan, indent=2) + "\n", encoding="utf-8")
    (folder / "exposure.csv").write_text(exposure_csv(plan), encoding="utf-8")
    figures = attack_figures(verdict) if verdict is not None else []
    html = render_report(ReportInputs(plan=plan, result=result, extra_figures=figures))
    (folder / "report.html").write_text(html, encoding="utf-8")


def outcome_error(outcome: AssessOutcome) -> AssessmentError | None:
    """The error to report after writing, when the assessment reached no usable partition."""
    plan = outcome.plan
    if plan["partition"] is not None or plan["scan"]["partial"]:
        return None
    return AssessmentError(f"{plan['recommendation']['reason']} The plan and report are in {outcome.out}.")


@contextlib.contextmanager
def rich_progress() -> Iterator[ProgressFn]:
    """A progress bar with ETA on stderr over the oracle work (channel images decided).

    It appears at the first update, so that a refusal before the scan prints one line only.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    bar = Progress(
        TextColumn("[bold]{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    task = bar.add_task("oracle", total=None, unit="channel images")
    started = False

    def update(done: int, total: int, current: str) -> None:
        nonlocal started
        if not started:
            bar.start()
            started = True
        attacking = current.startswith(("whitebox", "decoder"))
        description, _, unit = current.rpartition(": ") if attacking else (current, "", "channel images")
        bar.update(task, completed=done, total=total, description=description or "oracle", unit=unit)

    try:
        yield update
    finally:
        if started:
            bar.stop()
