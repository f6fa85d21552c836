"""The assessment under a stated adversary: the KL method combined with real inversion attacks.

The KL/oracle method asks whether any *single* feature map looks like the input to the model;
an attacker inverts the *whole* IR. So under an adversary that can mount attacks, a cut point is
safe only when the KL method calls it safe **and** the attacks' evidence supports a recovery
rate of at most `--max-recovery` (`attacks.evidence`: k of n photos recovered by any signal of
any attack, one-sided 95% Clopper-Pearson bound).

How the FrontNet end is chosen - a **fixed-sequence test**, deepest candidate first: the cuts
from the last one before the Tail back towards the KL method's own recommendation are tested
in that pre-set order, each at the full 5% level, and the search stops at the first cut that
is not safe; the recommendation is the shallowest cut of that unbroken chain of safe cuts.
Because each test is reached only after every earlier one was passed, the chance that any
cut in the chain is wrongly called safe stays at 5% without a correction for the number of
cuts tried. If the deepest candidate is not safe, no cut is: the plan then recommends the
whole model in the enclave.

**Confirmation.** The chosen cut is then attacked again, with the same attacks and budgets, on
the confirmation photos (`photosets`: photos that took no part in choosing it, disjoint by
pixel hash from the evaluation and training photos), and *their* bound decides: the cut is
recommended only when k of n fresh photos give a bound <= `--max-recovery`; otherwise nothing
is (the whole model in the enclave), because picking another cut after seeing the
confirmation photos would spend them. This needs at least `photos_needed(max_recovery)`
confirmation photos (29 at 10%); with fewer (packages missing, or a stricter
`--max-recovery`) the fixed-sequence test alone decides, and the plan's `selection` says so.

Cost control: a cut's white-box attack stops as soon as enough photos are recovered that it
cannot be safe, so broken cuts cost one chunk of photos; only cuts that hold get every photo
and every restart. The input-side cut is always attacked too (one chunk), so the report
shows what the host would see at the start of the network.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from infenclave.assess.attacks import (
    AttackResults,
    Budgets,
    ProgressEvent,
    TrainingSet,
    attacks_for,
    inversion_grid,
    run_attacks,
    training_photos,
)
from infenclave.assess.attacks.evidence import DEFAULT_MAX_RECOVERY, Evidence, can_confirm
from infenclave.assess.attacks.metrics import JudgePanel
from infenclave.assess.attacks.reident import Gallery
from infenclave.assess.kl import Oracle
from infenclave.assess.photosets import PhotoSet
from infenclave.assess.report import Figure, _plt, _png
from infenclave.assess.scan import ScanResult, scan
from infenclave.enclave.imaging import resize_and_crop
from infenclave.models.spec import LoadedModel
from infenclave.network import CutPoint, Network

if TYPE_CHECKING:
    from infenclave.assess.attacks.tasks import Executor, TaskStore

AttackProgressFn = Callable[[ProgressEvent], None]
GRID_PHOTOS = 8  # rows of the report's inversion picture (every photo's figures are in the plan)
SELECTION = (
    "fixed-sequence test, deepest candidate first, each cut at the full 5% level; "
    "the recommendation is the shallowest cut of the unbroken chain of safe cuts"
)
SELECTION_CONFIRMED = (
    SELECTION + ", chosen on the evaluation photos and confirmed on the confirmation photos, "
    "which took no part in choosing it: their bound decides"
)
SELECTION_UNCONFIRMED = (
    SELECTION + "; not confirmed on fresh photos: the confirmation set has too few photos for this bound"
)


@dataclass
class Confirmation:
    """The chosen cut attacked again on photos that took no part in choosing it."""

    cut: str
    names: list[str]
    by_source: dict[str, int]
    results: AttackResults

    @property
    def evidence(self) -> Evidence:
        ev = self.results.cut_evidence(self.cut)
        if ev is None:  # pragma: no cover - confirm_cut always attacks its cut
            raise AssertionError("a confirmation without an attacked cut")
        return ev

    def to_plan(self) -> dict[str, Any]:
        """The plan's `adversary.confirmation`: which photos, how many, the bound and each figure."""
        ev = self.evidence
        return {
            "cut": self.cut,
            "photos": len(self.names),
            "names": self.names,
            "by_source": self.by_source,
            "evidence": ev.to_dict(),
            "summary": ev.sentence(),
            "seconds": round(self.results.seconds, 1),
            "attacks": [c.to_dict() for c in self.results.cuts],
        }


@dataclass
class AdversaryVerdict:
    """What `build_plan` needs from the attacks: the combined choice and every figure."""

    name: str
    attacks: tuple[str, ...]
    front_end: CutPoint | None
    results: AttackResults | None
    attacked: list[str] = field(default_factory=list)
    max_recovery: float = DEFAULT_MAX_RECOVERY
    verdict: str = "safe"  # evidence verdict of the deepest candidate when none is chosen
    photo_sets: dict[str, Any] = field(default_factory=dict)
    selection: str = SELECTION
    confirmation: Confirmation | None = None
    eval_photos: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # not in the plan
    training_photos: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def cut_safe(self, cut: str) -> bool | None:
        """False when the attacks' evidence does not support safety, True when it does, None where none ran."""
        unsafe = self.results.cut_unsafe(cut) if self.results is not None else None
        return None if unsafe is None else not unsafe

    def evidence(self, cut: str) -> Evidence | None:
        return self.results.cut_evidence(cut) if self.results is not None else None

    def to_plan(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": self.name,
            "attacks": list(self.attacks),
            "front_end": self.front_end.name if self.front_end else None,
            "attacked_cuts": self.attacked,
            "max_recovery": self.max_recovery,
            "selection": self.selection,
            "photo_sets": self.photo_sets,
        }
        if self.confirmation is not None:
            doc["confirmation"] = self.confirmation.to_plan()
        if self.results is not None:
            doc["results"] = self.results.to_dict()
        return doc


def build_gallery(
    model: LoadedModel, panel: JudgePanel, eval_images: dict[str, np.ndarray], sets: dict[str, PhotoSet]
) -> Gallery:
    """Every evaluation photo plus every offline photo, at the model's input crop."""
    photos = {n: resize_and_crop(rgb, model.preprocess) for n, rgb in eval_images.items()}
    for s in sets.values():
        for p in s.photos:
            photos.setdefault(p.name, resize_and_crop(p.rgb, model.preprocess))
    return Gallery(photos, panel.features)


def confirmation_photos(
    sets: dict[str, PhotoSet],
    max_recovery: float = DEFAULT_MAX_RECOVERY,
    exclude: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray] | None:
    """The confirmation photos (name -> pixels) when there are enough to confirm a cut at
    `max_recovery` (`evidence.can_confirm`), else None. Photos whose pixels equal one of
    `exclude` (the evaluation photos, e.g. the caller's --attack-images) are left out."""
    from infenclave.assess.attacks.training_data import _shrink, pixel_sha256

    # a set's photos are hashed as stored (short side at most 512 px): hash a caller's photo
    # both at full size and as it would be stored
    held = {h for v in (exclude or {}).values() for h in (pixel_sha256(v), pixel_sha256(_shrink(v)))}
    conf = sets.get("confirmation")
    photos = {p.name: p.rgb for p in conf.photos if p.sha256 not in held} if conf is not None else {}
    return photos if can_confirm(len(photos), max_recovery) else None


def confirm_cut(
    model: LoadedModel,
    net: Network,
    cut: str,
    photos: dict[str, np.ndarray],
    adversary: str,
    budgets: Budgets,
    panel: JudgePanel,
    seed: int,
    *,
    sources: dict[str, str] | None = None,
    gallery: Gallery | None = None,
    training: TrainingSet | None = None,
    max_recovery: float = DEFAULT_MAX_RECOVERY,
    surrogate: Network | None = None,
    progress: AttackProgressFn | None = None,
    executor: Executor | None = None,
) -> Confirmation:
    """Attack `cut` on `photos` as the chain attacked it (same attacks, budgets, stop rule) and
    return the fresh evidence. `sources` (name -> package) gives the per-source counts.

    Its tasks are not kept in the assessment's task store: their keys (adversary, attack, cut,
    batch, restart) are those of the chain's tasks at the same cut, so `--resume` runs the
    confirmation again rather than mistake one photo set's results for the other's."""
    res = run_attacks(
        model,
        net,
        [cut],
        photos,
        adversary,
        budgets,
        panel,
        seed,
        progress=progress,
        training=training,
        gallery=gallery,
        max_recovery=max_recovery,
        stop_when_unsafe=True,
        surrogate=surrogate,
        executor=executor,
    )
    by_source: dict[str, int] = {}
    for n in photos:
        src = (sources or {}).get(n, n.split(":", 1)[0])
        by_source[src] = by_source.get(src, 0) + 1
    return Confirmation(cut, list(photos), by_source, res)


def assess_adversary(
    model: LoadedModel,
    net: Network,
    result: ScanResult,
    oracle: Oracle,
    eval_images: dict[str, np.ndarray] | None,
    *,
    adversary: str,
    tail: CutPoint,
    full: bool,
    budgets: Budgets,
    judge: str | None,
    seed: int,
    max_recovery: float = DEFAULT_MAX_RECOVERY,
    surrogate: Network | None = None,
    progress: AttackProgressFn | None = None,
    say: Callable[[str], None] = lambda _m: None,
    executor: Executor | None = None,
    store: TaskStore | None = None,
) -> AdversaryVerdict:
    """Run the adversary's attacks where they can change the answer; merge KL results.

    `eval_images` None: the offline evaluation set (`photosets`, >= 40 photos). The attack
    tasks run on `executor` (default: in this process) and are kept in `store` (`run_attacks`).
    """
    from infenclave.assess.photosets import offline_sets

    chosen = attacks_for(adversary)
    kl_rec = result.recommended
    if not chosen:
        return AdversaryVerdict(adversary, chosen, kl_rec.cut if kl_rec else None, None, max_recovery=max_recovery)
    say("loading the offline photo sets (training, evaluation, confirmation)")
    sets = offline_sets()
    if eval_images is None:
        eval_images = sets["evaluation"].images()
        sets_doc = {k: v.summary() for k, v in sets.items()}
    else:
        sets_doc = {k: v.summary() for k, v in sets.items() if k != "evaluation"}
        sets_doc["evaluation"] = {
            "role": "evaluation",
            "photos": len(eval_images),
            "target": 0,
            "by_source": {"--attack-images": len(eval_images)},
            "names": list(eval_images),
            "sha256": [],
            "excluded": [],
            "missing_packages": [],
        }
    maps = [c for c in net.cuts if c.is_feature_map and c.index < tail.index]
    if full:
        candidates = maps
    elif kl_rec is not None:
        candidates = [c for c in maps if c.index >= kl_rec.cut.index]
    else:
        candidates = []
    panel = JudgePanel.for_model(model, judge)
    say(f"building the re-identification gallery ({panel.names[0]} features)")
    gallery = build_gallery(model, panel, eval_images, sets)
    training: TrainingSet | None = training_photos(exclude=eval_images) if "decoder" in chosen else None

    def attack(cuts: list[CutPoint], *, stop_when_unsafe: bool = True) -> AttackResults:
        return run_attacks(
            model,
            net,
            [c.name for c in cuts],
            eval_images,
            adversary,
            budgets,
            panel,
            seed,
            progress=progress,
            training=training,
            gallery=gallery,
            max_recovery=max_recovery,
            stop_when_unsafe=stop_when_unsafe,
            surrogate=surrogate,
            executor=executor,
            store=store,
        )

    # the input-side cut as a reference point: what the host would see at the very start
    merged = attack(maps[:1]) if maps and maps[0] not in candidates else None
    front_end: CutPoint | None = None
    deepest_verdict = "unsafe"
    say(
        f"testing {len(candidates)} candidate cut point(s) as a {adversary} adversary "
        f"({', '.join(chosen)}; {len(eval_images)} photos), deepest first"
    )
    chain_open = True
    for i, cut in enumerate(reversed(candidates)):
        part = attack([cut])
        merged = part if merged is None else _merge(merged, part)
        ev = part.cut_evidence(cut.name)
        if i == 0 and ev is not None:
            deepest_verdict = ev.verdict
        if ev is None or ev.verdict != "safe" or not _kl_safe(net, result, oracle, cut, seed):
            chain_open = False
        if chain_open:
            front_end = cut
        elif not full:
            break  # --full attacks every cut for the report; the chain is already decided
    selection, confirmation = SELECTION, None
    if front_end is not None:
        fresh = confirmation_photos(sets, max_recovery, exclude=eval_images)
        if fresh is None:
            selection = SELECTION_UNCONFIRMED
        else:
            say(f"confirming {front_end.name} on {len(fresh)} confirmation photos that took no part in choosing it")
            confirmation = confirm_cut(
                model,
                net,
                front_end.name,
                fresh,
                adversary,
                budgets,
                panel,
                seed,
                sources={p.name: p.source for p in sets["confirmation"].photos},
                gallery=gallery,
                training=training,
                max_recovery=max_recovery,
                surrogate=surrogate,
                progress=progress,
                executor=executor,
            )
            selection = SELECTION_CONFIRMED
            if confirmation.evidence.verdict != "safe":
                front_end, deepest_verdict = None, confirmation.evidence.verdict
    verdict = (
        "safe"
        if front_end is not None
        else ("not-enough-evidence" if deepest_verdict == "not-enough-evidence" else "unsafe")
    )
    return AdversaryVerdict(
        adversary,
        chosen,
        front_end,
        merged,
        attacked=[c.cut for c in merged.cuts] if merged else [],
        max_recovery=max_recovery,
        verdict=verdict,
        photo_sets=sets_doc,
        selection=selection,
        confirmation=confirmation,
        eval_photos=dict(eval_images),
        training_photos=sets["training"].images(),
    )


def public_surrogate(model: LoadedModel, net: Network, name: str | None = None) -> Network:
    """The public network `model` was fine-tuned from: `name`, or the first zoo model whose
    cut points have the same names and shapes (a fine-tune keeps the architecture)."""
    from infenclave.errors import AssessmentError
    from infenclave.models import load_model, zoo
    from infenclave.network import analyse

    names = [name] if name else list(zoo.ZOO)
    for n in names:
        cand = analyse(load_model(n))
        if [(c.name, c.shape) for c in cand.cuts] == [(c.name, c.shape) for c in net.cuts]:
            if cand.model.weights_sha256 == model.weights_sha256:
                raise AssessmentError(
                    f"{model.name} has exactly the public weights of {n}: use --adversary knows-weights"
                )
            return cand
    raise AssessmentError(
        f"no public zoo model has {model.name}'s architecture"
        + (f" ({name} differs)" if name else "")
        + "; the surrogate-weights adversary needs the public starting point"
    )


def _kl_safe(net: Network, result: ScanResult, oracle: Oracle, cut: CutPoint, seed: int) -> bool:
    """The KL verdict at `cut`, scanning it now if the early-stop scan never reached it."""
    cr = result.cuts[cut.index]
    if cr.status == "not-scanned":
        extra = scan(net, oracle, result.images, mode=result.mode, seed=seed, only=[cut.name])
        if extra.partial:  # the scan took the Ctrl-C: the assessment stops here
            raise KeyboardInterrupt
        result.cuts[cut.index] = extra.cuts[cut.index]
        result.stats.channel_images += extra.stats.channel_images
        result.stats.forwarded += extra.stats.forwarded
        cr = result.cuts[cut.index]
    return cr.status == "safe"


def _merge(a: AttackResults, b: AttackResults) -> AttackResults:
    a.cuts.extend(b.cuts)
    a.seconds += b.seconds
    a.stopped_early.update(b.stopped_early)
    return a


def cut_records(verdict: AdversaryVerdict) -> dict[str, dict[str, Any]]:
    """Per cut name: {attack: summary} for the plan's per-cut `metrics` and `verdicts`."""
    out: dict[str, dict[str, Any]] = {}
    if verdict.results is None:
        return out
    for c in verdict.results.cuts:
        d = c.to_dict()
        out.setdefault(c.cut, {})[c.attack] = {k: v for k, v in d.items() if k not in ("cut", "cut_index", "shape")}
    return out


def attack_figures(verdict: AdversaryVerdict) -> list[Figure]:
    """Each photo beside its reconstruction per attacked cut, and the metrics by depth."""
    res = verdict.results
    if res is None or not res.cuts:
        return []
    section = f"What an attacker recovers ({verdict.name} adversary)"
    figs: list[Figure] = []
    for attack in verdict.attacks:
        if not any(c.attack == attack for c in res.cuts):
            continue
        grid = inversion_grid(res, attack, images=list(res.originals)[:GRID_PHOTOS])
        buf = io.BytesIO()
        Image.fromarray(grid).save(buf, format="PNG", optimize=True)
        figs.append(
            Figure(
                id=f"inversion-{attack}",
                section=section,
                title=f"{attack} inversion: each photo beside its reconstruction",
                caption=(
                    "Left: the photo as the model sees it. Then one column per attacked cut "
                    "point: what an attacker rebuilt from the IR alone, with its SSIM and whether "
                    "it was re-identified (its own photo ranked first in the gallery) or "
                    "recognised by a judge. A recovered photo counts against that cut; the "
                    "verdict is the bound in the attack evidence table, never a picture."
                ),
                png=buf.getvalue(),
                alt=f"{attack} reconstructions per cut point",
            )
        )
    figs.append(_metrics_figure(res, section))
    return figs


def _metrics_figure(res: AttackResults, section: str) -> Figure:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for attack in res.attacks:
        rows = sorted((c for c in res.cuts if c.attack == attack), key=lambda c: c.cut_index)
        if not rows:
            continue
        xs = [c.cut for c in rows]
        axes[0].plot(xs, [np.mean([r.ssim for r in c.images]) for c in rows], "o-", label=attack)
        axes[1].plot(xs, [c.recovered_count / max(1, len(c.images)) for c in rows], "o-", label=f"{attack}: recovered")
        axes[1].plot(
            xs, [c.reidentified_count / max(1, len(c.images)) for c in rows], "x--", label=f"{attack}: re-identified"
        )
        axes[2].plot(xs, [np.mean([r.judge_kl for r in c.images]) for c in rows], "o-", label=attack)
    for ax, title in zip(axes, ("mean SSIM", "share of photos recovered / re-identified", "mean judge KL (nats)")):
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=60, labelsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    png = _png(fig)
    plt.close(fig)
    return Figure(
        id="attack-metrics",
        section=section,
        title="Attack metrics by depth",
        caption=(
            "Per attacked cut point: mean SSIM of the reconstructions, the share of "
            "photos recovered (any signal) and re-identified, and the KL between the judge's outputs on "
            "original and reconstruction (higher = less revealed). SSIM under-rates "
            "what a person recognises: read it with the pictures above."
        ),
        png=png,
        alt="attack metrics by depth",
    )
