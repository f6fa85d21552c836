"""Run the attacks an adversary can mount at each cut point, and judge every reconstruction.

Adversaries (the owner chooses; `knows-weights` is the strongest and the default):

- `knows-weights`: holds the FrontNet weights -> white-box inversion (`whitebox`).
- `chosen-inputs`: weights secret, can submit its own photos and observe IRs -> inverse
  network (`decoder`) trained on the offline photo set (`training_data`).
- `passive`: weights secret, no queries -> no attack here; only the KL/oracle method applies.

A knows-weights attacker could also train a decoder (it can compute IRs itself); by default
only the white-box attack runs for it, because it recovered more than the decoder at every
cut measured (bench/results/attacks.json) and the default assessment has a time budget. Pass
`attacks=("whitebox", "decoder")` to run both.

The result keeps every figure and every reconstruction (as uint8 images), per attack, cut and
photo; `AttackResults.to_dict()` is the JSON-ready part for the plan (no pixels).
"""

from __future__ import annotations

import contextlib
import os
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from infenclave.assess.attacks import decoder as decoder_attack
from infenclave.assess.attacks import whitebox as whitebox_attack
from infenclave.assess.attacks._front import OnnxFront
from infenclave.assess.attacks.evidence import DEFAULT_MAX_RECOVERY, Evidence, judge_evidence
from infenclave.assess.attacks.metrics import RECOGNITION_TOP_K, Judge, JudgePanel, psnr, ssim, tiny_image
from infenclave.assess.attacks.reident import Gallery, Reidentification, rank_histogram
from infenclave.assess.attacks.training_data import (
    TrainingSet,
    builtin_photo_hashes,
    pixel_sha256,
    training_photos,
)
from infenclave.assess.attacks.verdict import TINY_IMAGE_SIDE, attack_verdict
from infenclave.enclave.imaging import resize_and_crop
from infenclave.errors import AssessmentError
from infenclave.models.spec import LoadedModel
from infenclave.network import Network

if TYPE_CHECKING:
    from infenclave.assess.attacks.tasks import Executor, TaskStore

ADVERSARIES = ("knows-weights", "surrogate-weights", "chosen-inputs", "passive")
DEFAULT_ADVERSARY = "knows-weights"
ATTACKS = ("whitebox", "decoder")
# surrogate-weights: the FrontNet is secret but fine-tuned from public weights; the attacker
# inverts the observed IR through the *public* weights (a fine-tuned model is not a secret model)
ATTACKS_FOR: dict[str, tuple[str, ...]] = {
    "knows-weights": ("whitebox",),
    "surrogate-weights": ("whitebox",),
    "chosen-inputs": ("decoder",),
    "passive": (),
}
# Which attacks each adversary is able to mount at all (a superset of the defaults above).
ALLOWED_FOR: dict[str, tuple[str, ...]] = {
    "knows-weights": ("whitebox", "decoder"),
    "surrogate-weights": ("whitebox", "decoder"),
    "chosen-inputs": ("decoder",),
    "passive": (),
}


@dataclass(frozen=True)
class Budgets:
    """How hard each attack tries: the speed/strength trade-off the owner may change."""

    whitebox_steps: int = whitebox_attack.DEFAULT_STEPS  # a cap per restart (plateau stop)
    decoder_epochs: int = decoder_attack.DEFAULT_EPOCHS
    whitebox_restarts: int = whitebox_attack.DEFAULT_RESTARTS

    def __post_init__(self) -> None:
        if self.whitebox_steps < 1 or self.decoder_epochs < 1 or self.whitebox_restarts < 1:
            raise AssessmentError("attack budgets must be at least 1 step / 1 epoch / 1 restart")

    def to_dict(self) -> dict[str, Any]:
        return {
            "whitebox_steps": self.whitebox_steps,
            "whitebox_restarts": self.whitebox_restarts,
            "whitebox_formulations": list(whitebox_attack.FORMULATIONS[: self.whitebox_restarts]),
            "whitebox_plateau": {
                "min_steps": whitebox_attack.MIN_STEPS,
                "window": whitebox_attack.PLATEAU_WINDOW,
                "tolerance": whitebox_attack.PLATEAU_TOLERANCE,
            },
            "decoder_epochs": self.decoder_epochs,
        }

    def label(self) -> str:
        return (
            f"white-box: up to {self.whitebox_steps} steps x {self.whitebox_restarts} restarts "
            f"({', '.join(whitebox_attack.FORMULATIONS[: self.whitebox_restarts])}), plateau stop; "
            f"decoder: {self.decoder_epochs} epochs"
        )


@dataclass(frozen=True)
class ProgressEvent:
    """One tick of progress: `done` of `total` steps (white-box) or epochs (decoder) of the
    batch running in this process, or `done` of `total` tasks of the cut (parallel executors)."""

    attack: str
    cut: str
    cut_number: int  # 1-based position among the cuts this attack runs on
    cuts_total: int
    done: int
    total: int
    unit: str = "steps"  # "steps" (epochs for the decoder) or "tasks"


ProgressFn = Callable[[ProgressEvent], None]


@dataclass
class ImageResult:
    """One photo's reconstruction at one cut by one attack, and what it reveals."""

    image: str
    reconstruction: np.ndarray  # (H, W, 3) uint8 at the model's input size
    ssim: float
    psnr: float
    ssim_reference: float  # SSIM of the photo's own TINY_IMAGE_SIDE px version
    recognised: bool  # judge: the original's top-1 is in the reconstruction's top-5
    judge_rank: int  # rank of the original's top-1 class for the reconstruction (1 = top)
    judge_kl: float  # KL(judge(original) || judge(reconstruction)), nats
    judge_original_label: str
    judge_original_prob: float
    judge_reconstruction_top5: tuple[str, ...]
    ir_error: float | None  # ||F(reconstruction) - IR||^2 / ||IR||^2 on the deployed FrontNet
    unsafe: bool = False  # recovered: by any signal (attack_verdict)
    classifiable: bool = True  # the judge panel agrees on what the original shows
    judges: list[dict[str, Any]] = field(default_factory=list)  # per judge of the panel
    reid: Reidentification | None = None

    @property
    def reidentified(self) -> bool:
        return self.reid is not None and self.reid.reidentified

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "ssim": self.ssim,
            "psnr": _finite(self.psnr),
            "ssim_reference": self.ssim_reference,
            "recognised": self.recognised,
            "judge_rank": self.judge_rank,
            "judge_kl": self.judge_kl,
            "judge_original_label": self.judge_original_label,
            "judge_original_prob": self.judge_original_prob,
            "judge_reconstruction_top5": list(self.judge_reconstruction_top5),
            "ir_error": self.ir_error,
            "unsafe": self.unsafe,
            "recovered": self.unsafe,
            "classifiable": self.classifiable,
            "judges": self.judges,
            "reidentification": self.reid.to_dict() if self.reid is not None else None,
        }


@dataclass
class CutAttackResult:
    """One attack at one cut point, over all evaluation photos."""

    attack: str
    cut: str
    cut_index: int
    shape: tuple[int, ...]
    budget: int  # white-box steps or decoder epochs
    attack_seconds: float  # optimisation / decoder training + decoding (not judging)
    seconds_per_reconstruction: float  # attack_seconds / photos
    images: list[ImageResult]
    extra: dict[str, Any] = field(default_factory=dict)  # attack-specific figures
    photos_planned: int = 0  # photos this cut was to be attacked on (> len(images): stopped)
    max_recovery: float = DEFAULT_MAX_RECOVERY

    @property
    def evidence(self) -> Evidence:
        """k recovered of the photos planned: photos not attacked after an early stop count as
        not recovered, which is the most favourable case and still unsafe (that is the stop rule)."""
        n = max(self.photos_planned, len(self.images))
        return judge_evidence(self.recovered_count, n, self.max_recovery)

    @property
    def unsafe(self) -> bool:
        """Not safe: recovered photos or too little evidence (see `evidence`)."""
        return self.evidence.verdict != "safe"

    @property
    def recovered_count(self) -> int:
        return sum(r.unsafe for r in self.images)

    @property
    def recognised_count(self) -> int:
        return sum(r.recognised for r in self.images)

    @property
    def reidentified_count(self) -> int:
        return sum(r.reidentified for r in self.images)

    def to_dict(self) -> dict[str, Any]:
        n = max(1, len(self.images))
        finite_psnr = [r.psnr for r in self.images if np.isfinite(r.psnr)]
        return {
            "attack": self.attack,
            "cut": self.cut,
            "cut_index": self.cut_index,
            "shape": list(self.shape),
            "budget": self.budget,
            "attack_seconds": self.attack_seconds,
            "seconds_per_reconstruction": self.seconds_per_reconstruction,
            "unsafe": self.unsafe,
            "recognised": self.recognised_count,
            "photos": len(self.images),
            "photos_planned": max(self.photos_planned, len(self.images)),
            "recovered": self.recovered_count,
            "reidentified": self.reidentified_count,
            "unclassifiable": sum(not r.classifiable for r in self.images),
            "evidence": self.evidence.to_dict(),
            "rank_histogram": {
                sig: rank_histogram([getattr(r.reid, f"{sig}_rank") for r in self.images if r.reid is not None], 0)
                for sig in ("structural", "deep")
            },
            "mean_ssim": sum(r.ssim for r in self.images) / n,
            "mean_psnr": float(np.mean(finite_psnr)) if finite_psnr else None,
            "max_ssim_over_reference": max((r.ssim - r.ssim_reference for r in self.images), default=None),
            "mean_judge_kl": sum(r.judge_kl for r in self.images) / n,
            "images": [r.to_dict() for r in self.images],
            **self.extra,
        }


@dataclass
class AttackResults:
    """Everything `run_attacks` found: JSON via `to_dict()`, pixels via the records."""

    adversary: str
    attacks: tuple[str, ...]
    budgets: Budgets
    seed: int
    judge: dict[str, Any]
    originals: dict[str, np.ndarray]  # name -> (H, W, 3) uint8, the model's input crop
    original_sha256: dict[str, str]  # name -> pixel hash of the decoded evaluation photo
    cuts: list[CutAttackResult] = field(default_factory=list)
    training: dict[str, Any] | None = None  # TrainingSet.summary() when the decoder ran
    threads: int = 0
    seconds: float = 0.0
    stopped_early: dict[str, str] = field(default_factory=dict)  # attack -> last cut run
    gallery: dict[str, Any] | None = None  # re-identification gallery: size, chance
    max_recovery: float = DEFAULT_MAX_RECOVERY
    executor: dict[str, Any] = field(default_factory=dict)  # where the tasks ran (not a setting)

    def cut_evidence(self, cut: str) -> Evidence | None:
        """All attacks at `cut` together: a photo is recovered when any attack recovered it."""
        rows = [c for c in self.cuts if c.cut == cut]
        if not rows:
            return None
        recovered = {r.image for c in rows for r in c.images if r.unsafe}
        n = max(max(c.photos_planned, len(c.images)) for c in rows)
        return judge_evidence(len(recovered), n, self.max_recovery)

    def result(self, attack: str, cut: str) -> CutAttackResult | None:
        return next((c for c in self.cuts if c.attack == attack and c.cut == cut), None)

    def cut_unsafe(self, cut: str) -> bool | None:
        """Not safe by the combined evidence of the attacks there; None when none ran."""
        ev = self.cut_evidence(cut)
        return None if ev is None else ev.verdict != "safe"

    def to_dict(self) -> dict[str, Any]:
        return {
            "adversary": self.adversary,
            "attacks": list(self.attacks),
            "budgets": self.budgets.to_dict(),
            "seed": self.seed,
            "judge": self.judge,
            "verdict_rule": {
                "recognised_top_k": RECOGNITION_TOP_K,
                "tiny_image_side": TINY_IMAGE_SIDE,
                "max_recovery": self.max_recovery,
                "rule": "a photo is recovered when its source ranks first in the "
                "re-identification gallery (structural or deep), or any "
                "judge of the panel recognises it (classifiable photos), "
                "or its SSIM reaches the photo's own tiny image; a cut is "
                "safe when the one-sided 95% Clopper-Pearson upper bound "
                "on the recovery rate is <= max_recovery",
            },
            "gallery": self.gallery,
            "images": [{"name": n, "sha256": h} for n, h in self.original_sha256.items()],
            "training": self.training,
            "threads": self.threads,
            "executor": self.executor,
            "seconds": self.seconds,
            "stopped_early": self.stopped_early,
            "cuts": [c.to_dict() for c in self.cuts],
        }


def _finite(v: float | None) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


def load_eval_images(paths: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Decode evaluation photos (default: the 8 built-in photos) into (H, W, 3) uint8 arrays."""
    from pathlib import Path

    from infenclave.enclave.imaging import decode_image
    from infenclave.predict import read_image_file
    from infenclave.sample_images import builtin_images

    chosen = paths if paths is not None else builtin_images()
    return {name: decode_image(read_image_file(Path(p))) for name, p in chosen.items()}


def attacks_for(adversary: str, attacks: Sequence[str] | None = None) -> tuple[str, ...]:
    """The attacks to run for `adversary`: its defaults, or `attacks` if it can mount them."""
    if adversary not in ADVERSARIES:
        raise AssessmentError(f"unknown adversary {adversary!r}; use one of {', '.join(ADVERSARIES)}")
    if attacks is None:
        return ATTACKS_FOR[adversary]
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise AssessmentError(f"unknown attack(s) {', '.join(unknown)}; use {', '.join(ATTACKS)}")
    refused = [a for a in attacks if a not in ALLOWED_FOR[adversary]]
    if refused:
        raise AssessmentError(f"the {adversary} adversary cannot mount: {', '.join(refused)}")
    return tuple(dict.fromkeys(attacks))


def derive_seed(seed: int, attack: str, cut: str) -> int:
    """A per-(attack, cut) seed, so a cut's result does not depend on which other cuts ran."""
    return int(np.random.SeedSequence([seed, zlib.crc32(f"{attack}:{cut}".encode())]).generate_state(1)[0])


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Set torch's intra-op threads for the attacks (default: the CPUs this process may use)."""
    import torch

    before = torch.get_num_threads()
    n = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


WHITEBOX_CHUNK = 8  # photos per white-box batch; a cut stops once its verdict can only be unsafe


def run_attacks(
    model: LoadedModel,
    net: Network,
    cut_names: Sequence[str],
    eval_images: Mapping[str, np.ndarray],
    adversary: str = DEFAULT_ADVERSARY,
    budgets: Budgets | None = None,
    judge: JudgePanel | Judge | str | None = None,
    seed: int = 0,
    *,
    attacks: Sequence[str] | None = None,
    progress: ProgressFn | None = None,
    threads: int | None = None,
    stop_after_safe: int | None = None,
    training: TrainingSet | None = None,
    gallery: Gallery | None = None,
    max_recovery: float = DEFAULT_MAX_RECOVERY,
    stop_when_unsafe: bool = True,
    surrogate: Network | None = None,
    executor: Executor | None = None,
    store: TaskStore | None = None,
) -> AttackResults:
    """Attack every cut in `cut_names` with what `adversary` can mount; judge each photo.

    `eval_images` are decoded photos ((H, W, 3) uint8, any size, e.g. `load_eval_images()`):
    they are resized and cropped as the model does, and always kept out of the decoder's
    training photos. `judge` is a `JudgePanel`, a `Judge` or model name (a second default
    judge is added), or None for the default panel. `gallery` holds every evaluation photo
    under its name (and >= 50 others) for re-identification; without one, re-identification
    is not run (and the plan says so). `stop_after_safe=k` stops an attack after k consecutive
    safe cuts; `stop_when_unsafe` stops a cut's white-box attack once enough photos are
    recovered that the cut cannot be safe (the rest would not change the verdict).
    `surrogate` (required for the surrogate-weights adversary): the public network the
    white-box attack differentiates through, while the observed IRs come from `net`, the
    deployed (fine-tuned) one.

    The work runs as independent tasks (`tasks`): in this process by default, or on
    `executor` (a local process pool, Ray); each finished task is kept in `store` when given,
    and a task found there is not run again (`assess --resume`).
    """
    start = time.perf_counter()
    chosen = attacks_for(adversary, attacks)
    budgets = budgets or Budgets()
    if not eval_images:
        raise AssessmentError("the attacks need at least one evaluation photo")
    points = [net.cut(c) for c in cut_names]
    if adversary == "surrogate-weights":
        if surrogate is None:
            raise AssessmentError(
                "the surrogate-weights adversary needs the public weights the model was fine-tuned from"
            )
        for p in points:
            if surrogate.cut(p.name).shape != p.shape:
                raise AssessmentError(
                    f"the public model {surrogate.model.name} has another shape "
                    f"at {p.name}: it is not what {model.name} was fine-tuned from"
                )
    pre = model.preprocess
    names = list(eval_images)
    originals = {n: resize_and_crop(np.asarray(eval_images[n], dtype=np.uint8), pre) for n in names}
    batch = np.stack([originals[n] for n in names])  # (B, H, W, 3) uint8
    results = AttackResults(
        adversary=adversary,
        attacks=chosen,
        budgets=budgets,
        seed=seed,
        judge={},
        originals=originals,
        original_sha256={n: pixel_sha256(eval_images[n]) for n in names},
        max_recovery=max_recovery,
    )
    if not chosen or not points:
        results.seconds = time.perf_counter() - start
        return results
    if "decoder" in chosen:
        training = training or training_photos(exclude=eval_images)
        held_out = set(results.original_sha256.values()) | builtin_photo_hashes()
        kept = {p.sha256 for p in training.photos} | {pixel_sha256(p.pixels) for p in training.photos}
        if kept & held_out:  # a caller-supplied TrainingSet must obey the rule too
            raise AssessmentError("the decoder's training photos include an evaluation photo")
        results.training = training.summary()
    panel = (
        judge
        if isinstance(judge, JudgePanel)
        else JudgePanel.for_model(model, judge.name if isinstance(judge, Judge) else judge)
    )
    results.judge = panel.to_dict()
    if gallery is not None:
        results.gallery = {
            "photos": len(gallery),
            "chance_per_photo": round(gallery.chance, 4),
            "signals": ["structural (16+32 px grey thumbnails)", f"deep ({panel.names[0]} pooled features)"],
        }
    p_original = panel.probabilities(batch)  # per judge (B, classes)
    references = [ssim(o, tiny_image(o, TINY_IMAGE_SIDE)) for o in batch]

    from infenclave.assess.attacks.tasks import AttackContext
    from infenclave.assess.attacks.tasks import Executor as InProcess

    executor = executor or InProcess()
    context = AttackContext(
        surrogate or net, net if "decoder" in chosen else None, training if "decoder" in chosen else None
    )
    with torch_threads(threads) as n_threads:
        results.threads = n_threads
        results.executor = executor.to_dict()
        executor.start(context)
        fronts: dict[str, OnnxFront] = {}
        for attack in chosen:
            safe_run = 0
            for number, point in enumerate(points, 1):
                if point.name not in fronts:  # one ONNX Runtime session per cut, shared by attacks
                    fronts[point.name] = OnnxFront(net, point.name, threads=n_threads)
                front = fronts[point.name]

                def judge_batch(
                    sl: slice, recon: np.ndarray, observed: np.ndarray, front: OnnxFront = front
                ) -> list[ImageResult]:
                    return judge_reconstructions(
                        panel,
                        names[sl],
                        batch[sl],
                        recon,
                        p_original=[p[sl] for p in p_original],
                        references=references[sl],
                        ir_errors=_relative_ir_errors(front(recon), observed),
                        gallery=gallery,
                    )

                cut_result = _attack_cut(
                    _CutJob(adversary, attack, point.name, point.index, point.shape, number, len(points)),
                    front,
                    names,
                    batch,
                    budgets,
                    seed,
                    executor,
                    context,
                    store,
                    progress,
                    judge_batch,
                    stop_when_unsafe,
                    max_recovery,
                )
                results.cuts.append(cut_result)
                safe_run = 0 if cut_result.unsafe else safe_run + 1
                if stop_after_safe is not None and safe_run >= stop_after_safe:
                    results.stopped_early[attack] = point.name
                    break
    results.seconds = time.perf_counter() - start
    return results


@dataclass(frozen=True)
class _CutJob:
    adversary: str
    attack: str
    cut: str
    cut_index: int
    shape: tuple[int, ...]
    number: int  # 1-based among the cuts of this call
    cuts_total: int


def _attack_cut(
    job: _CutJob,
    front: OnnxFront,
    names: list[str],
    batch: np.ndarray,
    budgets: Budgets,
    seed: int,
    executor: Any,
    context: Any,
    store: Any,
    progress: ProgressFn | None,
    judge_batch: Callable[[slice, np.ndarray, np.ndarray], list[ImageResult]],
    stop_when_unsafe: bool,
    max_recovery: float,
) -> CutAttackResult:
    """One attack at one cut: its tasks, run `executor.workers` at a time, judged in batch order.

    Tasks are submitted in (batch, restart) order and may run ahead of the judging; a batch is
    judged once all its restarts are back, and the cut stops (the white-box attack) once its
    verdict can only be unsafe. Results are taken in batch order only, so which tasks ran ahead
    never changes the figures; what ran ahead and was not needed is still stored for a resume.
    """
    from concurrent.futures import FIRST_COMPLETED, Future, wait

    from infenclave.assess.attacks.tasks import AttackTask, TaskResult

    whitebox = job.attack == "whitebox"
    chunk = WHITEBOX_CHUNK if whitebox else len(names)
    restarts = budgets.whitebox_restarts if whitebox else 1
    step_cap = budgets.whitebox_steps if whitebox else budgets.decoder_epochs
    slices = [slice(lo, lo + chunk) for lo in range(0, len(names), chunk)]
    order = [(b, r) for b in range(len(slices)) for r in range(restarts)]
    observed: dict[int, np.ndarray] = {}
    cut_result = CutAttackResult(
        attack=job.attack,
        cut=job.cut,
        cut_index=job.cut_index,
        shape=job.shape,
        budget=0,
        attack_seconds=0.0,
        seconds_per_reconstruction=0.0,
        images=[],
        photos_planned=len(names),
        max_recovery=max_recovery,
    )
    done_tasks = 0
    total_tasks = len(order)
    steps_total = restarts * step_cap
    steps_done: dict[int, int] = {}  # batch -> steps of its finished restarts (in-process ticks)

    def report(done: float, total: int, unit: str) -> None:
        if progress is not None:
            progress(ProgressEvent(job.attack, job.cut, job.number, job.cuts_total, int(done), total, unit))

    def make(b: int, r: int) -> AttackTask:
        sl = slices[b]
        if b not in observed:
            observed[b] = front(batch[sl])  # (b, *cut shape): what the host sees
        base = derive_seed(seed, job.attack, job.cut) + sl.start
        return AttackTask(
            adversary=job.adversary,
            attack=job.attack,
            cut=job.cut,
            batch=b,
            restart=r,
            photos=tuple(names[sl]),
            seed=whitebox_attack.restart_seed(base, r) if whitebox else base,
            budget=step_cap,
            observed=observed[b],
        )

    def submit(b: int, r: int) -> Future[TaskResult]:
        task = tasks[b, r] = make(b, r)
        kept = store.get(task, context.identity) if store is not None else None
        if kept is not None:
            fut: Future[TaskResult] = Future()
            fut.set_result(kept)
            return fut
        tick = None
        if executor.steps_progress and progress is not None:
            base_steps = steps_done.get(b, 0)

            def tick(done: int, _total: int, _base: int = base_steps) -> None:
                report(min(steps_total, _base + done), steps_total, "steps")

        fut = executor.submit(task, tick)
        if store is not None:
            fut.add_done_callback(lambda f: _store_result(store, f))
        return fut

    futures: dict[tuple[int, int], Future[TaskResult]] = {}
    tasks: dict[tuple[int, int], AttackTask] = {}
    queue = list(order)
    next_batch = 0
    while next_batch < len(slices):
        while (
            queue
            and sum(not f.done() for f in futures.values()) < executor.workers
            and (executor.workers > 1 or queue[0][0] == next_batch)  # run ahead only in parallel
        ):
            b, r = queue.pop(0)
            fut = futures[b, r] = submit(b, r)
            if executor.steps_progress and fut.done() and fut.exception() is None:
                steps_done[b] = steps_done.get(b, 0) + int(fut.result().meta.get("steps", 0))
        wanted = [futures.get((next_batch, r)) for r in range(restarts)]
        if any(f is None or not f.done() for f in wanted):
            wait([f for f in futures.values() if not f.done()], return_when=FIRST_COMPLETED)
            finished = sum(f.done() for f in futures.values())
            if not executor.steps_progress and finished > done_tasks:
                done_tasks = finished
                report(done_tasks, total_tasks, "tasks")
            continue
        parts = [f.result() for f in wanted if f is not None]
        recon, budget, seconds, extra = _combine(job.attack, parts, step_cap)
        cut_result.budget = max(cut_result.budget, budget)
        cut_result.attack_seconds += seconds
        _merge_extra(cut_result.extra, extra)
        cut_result.images.extend(judge_batch(slices[next_batch], recon, observed[next_batch]))
        next_batch += 1
        stop = whitebox and stop_when_unsafe and cut_result.evidence.verdict == "unsafe"
        if stop:
            for key, f in futures.items():
                if not f.done():
                    executor.cancel(tasks[key], f)  # not started: dropped; running: told to stop
        if executor.steps_progress:
            report(steps_total, steps_total, "steps")
        else:
            done_tasks = total_tasks if stop else max(done_tasks, sum(f.done() for f in futures.values()))
            report(done_tasks, total_tasks, "tasks")
        if stop:
            break  # more photos could only add recoveries
    cut_result.seconds_per_reconstruction = cut_result.attack_seconds / max(1, len(cut_result.images))
    return cut_result


def _store_result(store: Any, fut: Any) -> None:
    """Done-callback: keep a finished task's result (not one read back, failed or cancelled)."""
    if fut.cancelled() or fut.exception() is not None:
        return
    result = fut.result()
    if not result.stored:
        store.put(result)


def _combine(attack: str, parts: Sequence[Any], step_cap: int) -> tuple[np.ndarray, int, float, dict[str, Any]]:
    """(reconstructions (B, H, W, 3) uint8, budget, attack seconds, attack figures) of one batch."""
    if attack == "whitebox":
        records = [
            {**p.meta, "_reconstructions": p.reconstructions, "_ir_error": p.ir_error}
            for p in parts  # restarts in order
        ]
        wb = whitebox_attack.best_of_restarts(records)
        return wb.reconstructions, step_cap, wb.seconds, {"restarts": wb.runs, "kept": wb.chosen, "steps_run": wb.steps}
    (p,) = parts
    m = p.meta
    extra = {
        "train_seconds": m["train_seconds"],
        "invert_seconds": m["invert_seconds"],
        "training_photos": m["training_photos"],
        "training_views": m["training_views"],
        "final_train_loss": m["final_train_loss"],
    }
    return p.reconstructions, int(m["epochs"]), m["train_seconds"] + m["invert_seconds"], extra


def _merge_extra(into: dict[str, Any], extra: dict[str, Any]) -> None:
    """Attack-specific figures of several photo chunks of one cut: lists grow, numbers add."""
    for k, v in extra.items():
        if isinstance(v, list):
            into.setdefault(k, []).extend(v)
        elif k not in into:
            into[k] = v
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            into[k] = into[k] + v


def _relative_ir_errors(ir: np.ndarray, observed: np.ndarray) -> list[float | None]:
    """||F(reconstruction) - y||^2 / ||y||^2 per photo: how well the attack explains the IR."""
    axes = tuple(range(1, observed.ndim))
    num = np.sum((ir.astype(np.float64) - observed) ** 2, axis=axes)
    den = np.maximum(np.sum(observed.astype(np.float64) ** 2, axis=axes), 1e-12)
    return [float(v) for v in num / den]


def judge_reconstructions(
    judge: JudgePanel | Judge,
    names: Sequence[str],
    originals: np.ndarray,
    recon: np.ndarray,
    *,
    p_original: Sequence[np.ndarray] | np.ndarray | None = None,
    references: Sequence[float] | None = None,
    ir_errors: Sequence[float | None] | None = None,
    gallery: Gallery | None = None,
) -> list[ImageResult]:
    """Figures and verdict for each (original, reconstruction) pair ((B, H, W, 3) uint8 each).

    `p_original` (each judge on the originals: a list per judge, or one array for a single
    judge) and `references` (SSIM of each photo's tiny image) are computed when not given.
    With a `gallery` (holding every name in `names`), each reconstruction is also ranked
    against its source for re-identification.
    """
    judges = judge.judges if isinstance(judge, JudgePanel) else [judge]
    if p_original is None:
        p_original = [j.probabilities(originals) for j in judges]
    elif isinstance(p_original, np.ndarray):
        p_original = [p_original]
    if references is None:
        references = [ssim(o, tiny_image(o, TINY_IMAGE_SIDE)) for o in originals]
    if ir_errors is None:
        ir_errors = [None] * len(names)
    p_recon = [j.probabilities(recon) for j in judges]  # per judge (B, classes)
    reids = gallery.rank(recon, list(names)) if gallery is not None else [None] * len(names)
    out = []
    for i, name in enumerate(names):
        verdicts = [j.compare(po[i], pr[i]) for j, po, pr in zip(judges, p_original, p_recon)]
        classifiable = len(judges) < 2 or JudgePanel.classifiable([po[i] for po in p_original])
        first = verdicts[0]
        r = ImageResult(
            image=name,
            reconstruction=recon[i],
            ssim=ssim(originals[i], recon[i]),
            psnr=psnr(originals[i], recon[i]),
            ssim_reference=references[i],
            recognised=classifiable and any(v.recognised for v in verdicts),
            judge_rank=first.rank,
            judge_kl=first.kl,
            judge_original_label=first.original_top1_label,
            judge_original_prob=first.original_top1_prob,
            judge_reconstruction_top5=first.reconstruction_top5_labels,
            ir_error=ir_errors[i],
            classifiable=classifiable,
            reid=reids[i],
            judges=[
                {
                    "name": j.name,
                    "recognised": v.recognised,
                    "rank": v.rank,
                    "kl": round(v.kl, 4),
                    "original": v.original_top1_label,
                    "reconstruction_top5": list(v.reconstruction_top5_labels),
                }
                for j, v in zip(judges, verdicts)
            ],
        )
        r.unsafe = attack_verdict(r)
        out.append(r)
    return out
