"""The assessment under a stated adversary: the KL method combined with real inversion attacks.

The KL/oracle method asks whether any *single* feature map looks like the input to the model;
an attacker inverts the *whole* IR. So under an adversary that can mount attacks, a cut point is
safe only when the KL method calls it safe **and** no attack that adversary can mount recovers a
photo (`attacks.attack_verdict`: recognisable by an independent judge network, or structurally
closer than the photo's own thumbnail). The recommended FrontNet end is the first such cut; by
construction it is never earlier than the KL method's own (`passive`) recommendation.

Cost control: attacks run from the KL recommendation onwards and stop at the first cut they fail
to break (`--full` attacks every feature-map cut before the Tail). The input-side cut is always
attacked too, so the report shows what the host would see at the start of the network.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
import io
from typing import Any

import numpy as np
from PIL import Image

from infenclave.assess.attacks import (
    AttackResults,
    Budgets,
    Judge,
    ProgressEvent,
    TrainingSet,
    attacks_for,
    inversion_grid,
    run_attacks,
    training_photos,
)
from infenclave.assess.kl import Oracle
from infenclave.assess.report import Figure, _png, _plt
from infenclave.assess.scan import ScanResult, scan
from infenclave.models.spec import LoadedModel
from infenclave.network import CutPoint, Network

AttackProgressFn = Callable[[ProgressEvent], None]


@dataclass
class AdversaryVerdict:
    """What `build_plan` needs from the attacks: the combined choice and every figure."""

    name: str
    attacks: tuple[str, ...]
    front_end: CutPoint | None
    results: AttackResults | None
    attacked: list[str] = field(default_factory=list)

    def cut_safe(self, cut: str) -> bool | None:
        """False when any attack broke this cut, True when all failed, None where none ran."""
        unsafe = self.results.cut_unsafe(cut) if self.results is not None else None
        return None if unsafe is None else not unsafe

    def to_plan(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "attacks": list(self.attacks),
                               "front_end": self.front_end.name if self.front_end else None,
                               "attacked_cuts": self.attacked}
        if self.results is not None:
            doc["results"] = self.results.to_dict()
        return doc


def assess_adversary(model: LoadedModel, net: Network, result: ScanResult, oracle: Oracle,
                     eval_images: dict[str, np.ndarray], *, adversary: str, tail: CutPoint,
                     full: bool, budgets: Budgets, judge: str | None, seed: int,
                     progress: AttackProgressFn | None = None,
                     say: Callable[[str], None] = lambda _m: None) -> AdversaryVerdict:
    """Run the adversary's attacks where they can change the answer; merge KL results."""
    chosen = attacks_for(adversary)
    kl_rec = result.recommended
    if not chosen:
        return AdversaryVerdict(adversary, chosen, kl_rec.cut if kl_rec else None, None)
    maps = [c for c in net.cuts if c.is_feature_map and c.index < tail.index]
    if full:
        candidates = maps
    elif kl_rec is not None:
        candidates = [c for c in maps if c.index >= kl_rec.cut.index]
    else:
        candidates = []
    # the input-side cut as a reference point: what the host would see at the very start
    queue = ([maps[0]] if maps and maps[0] not in candidates else []) + candidates
    judge_obj = Judge.for_model(model, judge)
    training: TrainingSet | None = training_photos(exclude=eval_images) if "decoder" in chosen else None
    merged: AttackResults | None = None
    front_end: CutPoint | None = None
    while queue:
        say(f"attacking {len(queue)} cut point(s) as a {adversary} adversary "
            f"({', '.join(chosen)}); stopping at the first one the attacks do not break"
            if not full else f"attacking {len(queue)} cut point(s) as a {adversary} adversary")
        part = run_attacks(model, net, [c.name for c in queue], eval_images, adversary, budgets,
                           judge_obj, seed, progress=progress, training=training,
                           stop_after_safe=None if full else 1)
        merged = part if merged is None else _merge(merged, part)
        attacked = {c.cut for c in part.cuts}
        safe_now = [c for c in queue if c.name in attacked and part.cut_unsafe(c.name) is False]
        pick = next((c for c in safe_now if c in candidates and _kl_safe(net, result, oracle, c, seed)), None)
        if pick is not None or full:
            front_end = pick
            break
        last = max((c for c in queue if c.name in attacked), key=lambda c: c.index, default=None)
        queue = [c for c in candidates if last is not None and c.index > last.index]
    return AdversaryVerdict(adversary, chosen, front_end, merged,
                            attacked=[c.cut for c in merged.cuts] if merged else [])


def _kl_safe(net: Network, result: ScanResult, oracle: Oracle, cut: CutPoint, seed: int) -> bool:
    """The KL verdict at `cut`, scanning it now if the early-stop scan never reached it."""
    cr = result.cuts[cut.index]
    if cr.status == "not-scanned":
        extra = scan(net, oracle, result.images, mode=result.mode, seed=seed, only=[cut.name])
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
        grid = inversion_grid(res, attack)
        buf = io.BytesIO()
        Image.fromarray(grid).save(buf, format="PNG", optimize=True)
        figs.append(Figure(
            id=f"inversion-{attack}", section=section,
            title=f"{attack} inversion: each photo beside its reconstruction",
            caption=("Left: the photo as the model sees it. Then one column per attacked cut "
                     "point: what an attacker rebuilt from the IR alone, with its SSIM and whether "
                     "the judge network recognised it (top-1 class of the original in its top-5). "
                     "A recognisable reconstruction makes that cut unsafe under this adversary."),
            png=buf.getvalue(), alt=f"{attack} reconstructions per cut point"))
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
        axes[1].plot(xs, [c.recognised_count / max(1, len(c.images)) for c in rows], "o-", label=attack)
        axes[2].plot(xs, [np.mean([r.judge_kl for r in c.images]) for c in rows], "o-", label=attack)
    for ax, title in zip(axes, ("mean SSIM", "share recognised by the judge", "mean judge KL (nats)")):
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=60, labelsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    png = _png(fig)
    plt.close(fig)
    return Figure(id="attack-metrics", section=section, title="Attack metrics by depth",
                  caption=("Per attacked cut point: mean SSIM of the reconstructions, the share of "
                           "photos the judge recognised, and the KL between the judge's outputs on "
                           "original and reconstruction (higher = less revealed). SSIM under-rates "
                           "what a person recognises: read it with the pictures above."),
                  png=png, alt="attack metrics by depth")

