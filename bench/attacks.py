"""Benchmark of the inversion attacks (issue 5): cost per cut point, strength against budget.

Reports, on this machine (2 shared cores here: the load average is recorded, and timings
taken while other work runs are upper bounds):

1. `per_cut_cost`: for every feature-map cut point of Lite0, the white-box attack's seconds per
   Adam step for the batch of 8 built-in photos (median of PROBE_STEPS steps after a warm-up),
   the implied seconds per reconstruction at the default budget, and the decoder's seconds per
   training epoch (one augmented view of each training photo, FrontNet queries included).
   The white-box figure is the fastest of the probe steps (the least disturbed by other work
   on the shared machine); the median is recorded beside it.
2. `default_run`: `run_attacks` as the default assessment runs it (knows-weights, default
   budget, 8 built-in photos) over a representative candidate range (the end of each Lite0
   stage): wall time and, per cut, how many photos the judge recognised, mean SSIM, verdict.
3. `budget_curves`: how the metrics move with the budget, on 4 photos at an early, a middle
   and a deep cut: white-box at 25..800 steps and the decoder at 5..40 epochs (one run each,
   snapshots along the way: both use a constant step size, so a snapshot after k steps is
   exactly the k-step budget).

4. `figure`: docs/img/inversion-example.png, the same attack at the default budget on 3 photos
   and 5 of those cuts, each photo beside its reconstructions.

Usage:  .venv/bin/python bench/attacks.py [--out bench/results/attacks.json] [--quick]
                                         [--parts cost,default,curves,figure]
(`--parts` re-runs only some sections and updates them in an existing --out file.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = "efficientnet-lite0"
PROBE_STEPS = 5
# The last cut point of each Lite0 stage (where resolution or width changes), plus the stem.
STAGE_ENDS = [
    "_conv_stem",
    "_blocks.0",
    "_blocks.2",
    "_blocks.4",
    "_blocks.7",
    "_blocks.10",
    "_blocks.14",
    "_blocks.15",
]
FIGURE_PHOTOS = ["chelsea", "coffee", "astronaut"]
FIGURE_CUTS = ["_conv_stem", "_blocks.2", "_blocks.4", "_blocks.7", "_blocks.14"]
CURVE_PHOTOS = ["chelsea", "coffee", "astronaut", "rocket"]  # built-in names missing are skipped
CURVE_CUTS = ["_blocks.2", "_blocks.7", "_blocks.14"]
WHITEBOX_BUDGETS = [25, 50, 100, 200, 400, 800]
DECODER_BUDGETS = [5, 10, 20, 40]


def summarise(records: list[Any]) -> dict[str, Any]:
    """Mean figures over photos for one (attack, cut, budget)."""
    finite = [r.psnr for r in records if np.isfinite(r.psnr)]
    out = {
        "recognised": sum(r.recognised for r in records),
        "photos": len(records),
        "unsafe_photos": sum(r.unsafe for r in records),
        "mean_ssim": round(float(np.mean([r.ssim for r in records])), 4),
        "mean_psnr": round(float(np.mean(finite)), 2) if finite else None,
        "mean_judge_kl": round(float(np.mean([r.judge_kl for r in records])), 3),
        "median_judge_rank": float(np.median([r.judge_rank for r in records])),
    }
    errors = [r.ir_error for r in records if r.ir_error is not None]
    if errors:
        out["mean_ir_error"] = round(float(np.mean(errors)), 4)
    return out


def per_cut_cost(net: Any, batch: np.ndarray, training: Any, quick: bool) -> list[dict[str, Any]]:
    import torch

    from infenclave.assess.attacks import decoder, whitebox
    from infenclave.assess.attacks._front import OnnxFront, torch_front

    pre = net.model.preprocess
    rows = []
    cuts = [c for c in net.cuts if c.is_feature_map]
    for c in cuts[:3] if quick else cuts:
        front = torch_front(net, c.name)
        onnx_front = OnnxFront(net, c.name)
        target = onnx_front(batch)
        image = whitebox.PyramidImage(len(batch), pre.input_hw, 0)
        opt = torch.optim.Adam(image.parameters, lr=whitebox.LEARNING_RATE)
        times = []
        for step in range(PROBE_STEPS + 1):
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            x = image()
            loss = whitebox.relative_ir_error(
                front, x, torch.from_numpy(target), pre
            ) + whitebox.TV_WEIGHT * whitebox.total_variation(x)
            loss.sum().backward()
            opt.step()
            if step:  # the first step warms caches and allocators
                times.append(time.perf_counter() - t)
        step_s = min(times)  # the least-disturbed step: the machine is shared
        dec = decoder.train_and_invert(onnx_front, target, training, pre.input_hw, epochs=1)
        rows.append(
            {
                "cut": c.name,
                "shape": list(c.shape),
                "whitebox_seconds_per_step_batch8": round(step_s, 3),
                "whitebox_seconds_per_step_batch8_median": round(statistics.median(times), 3),
                "whitebox_seconds_per_reconstruction_at_default": round(
                    step_s * whitebox.DEFAULT_STEPS / len(batch), 2
                ),
                "whitebox_seconds_per_cut_at_default": round(step_s * whitebox.DEFAULT_STEPS, 1),
                "decoder_seconds_per_epoch": round(dec.train_seconds, 2),
                "decoder_seconds_per_cut_at_default": round(dec.train_seconds * decoder.DEFAULT_EPOCHS, 1),
            }
        )
        print(f"  cost {c.name}: {rows[-1]}", flush=True)
    return rows


def draw_figure(model: Any, net: Any, images: dict[str, np.ndarray], judge: Any, figure: Path) -> None:
    from infenclave.assess.attacks import run_attacks, save_inversion_grid

    chosen = {n: images[n] for n in FIGURE_PHOTOS}
    res = run_attacks(model, net, FIGURE_CUTS, chosen, "knows-weights", judge=judge, seed=0)
    save_inversion_grid(res, "whitebox", figure, images=FIGURE_PHOTOS)


def default_run(model: Any, net: Any, images: dict[str, np.ndarray], judge: Any, quick: bool) -> dict[str, Any]:
    from infenclave.assess.attacks import Budgets, run_attacks

    budgets = Budgets(whitebox_steps=5) if quick else Budgets()
    cuts = STAGE_ENDS[:2] if quick else STAGE_ENDS
    t = time.perf_counter()
    res = run_attacks(model, net, cuts, images, "knows-weights", budgets=budgets, judge=judge, seed=0)
    wall = time.perf_counter() - t
    return {
        "adversary": "knows-weights",
        "budgets": budgets.to_dict(),
        "photos": len(images),
        "cuts": cuts,
        "wall_seconds": round(wall, 1),
        "per_cut": [
            {
                "cut": c.cut,
                "shape": list(c.shape),
                "attack_seconds": round(c.attack_seconds, 1),
                "seconds_per_reconstruction": round(c.seconds_per_reconstruction, 2),
                **summarise(c.images),
                "unsafe": c.unsafe,
            }
            for c in res.cuts
        ],
    }


def budget_curves(net: Any, images: dict[str, np.ndarray], judge: Any, training: Any, quick: bool) -> dict[str, Any]:
    import torch

    from infenclave.assess.attacks import decoder, whitebox
    from infenclave.assess.attacks._front import OnnxFront, torch_front
    from infenclave.assess.attacks.runner import judge_reconstructions
    from infenclave.enclave.imaging import resize_and_crop

    pre = net.model.preprocess
    names = [n for n in CURVE_PHOTOS if n in images]
    batch = np.stack([resize_and_crop(images[n], pre) for n in names])
    p_original = judge.probabilities(batch)
    wb_budgets = [2, 4] if quick else WHITEBOX_BUDGETS
    dec_budgets = [1, 2] if quick else DECODER_BUDGETS
    out: dict[str, Any] = {"photos": names, "whitebox": [], "decoder": []}
    for cut in CURVE_CUTS[:1] if quick else CURVE_CUTS:
        onnx_front = OnnxFront(net, cut)
        target = onnx_front(batch)
        front = torch_front(net, cut)
        wb = whitebox.invert(front, target, pre, steps=max(wb_budgets), seed=0, snapshots=wb_budgets)
        per_step = wb.seconds / wb.steps
        for k in wb_budgets:
            with torch.no_grad():
                x = torch.from_numpy(wb.snapshots[k]).permute(0, 3, 1, 2).float() / 255.0
                errors = whitebox.relative_ir_error(front, x, torch.from_numpy(target), pre).tolist()
            recs = judge_reconstructions(judge, names, batch, wb.snapshots[k], p_original=p_original, ir_errors=errors)
            out["whitebox"].append(
                {
                    "cut": cut,
                    "steps": k,
                    "seconds": round(per_step * k, 1),
                    "loss": round(wb.loss_curve[k - 1], 4),
                    **summarise(recs),
                }
            )
            print(f"  whitebox {cut} {out['whitebox'][-1]}", flush=True)
        dec = decoder.train_and_invert(
            onnx_front, target, training, pre.input_hw, epochs=max(dec_budgets), seed=0, snapshots=dec_budgets
        )
        per_epoch = dec.train_seconds / dec.epochs
        for k in dec_budgets:
            recs = judge_reconstructions(judge, names, batch, dec.snapshots[k], p_original=p_original)
            out["decoder"].append(
                {
                    "cut": cut,
                    "epochs": k,
                    "seconds": round(per_epoch * k, 1),
                    "train_loss": round(dec.loss_curve[k - 1], 4),
                    **summarise(recs),
                }
            )
            print(f"  decoder {cut} {out['decoder'][-1]}", flush=True)
    return out


EVIDENCE_CUTS = ["_blocks.3", "_blocks.11", "_blocks.15"]  # the review's two cases and the deepest candidate
CONVERGENCE_CUT = "_blocks.15"  # the deepest candidate: where a knows-weights "safe" would have to hold
CONVERGENCE_PHOTOS = 4  # a time compromise on 2 shared cores (each cap runs both restarts)


def evidence_run(
    model: Any, net: Any, quick: bool, cuts: list[str] | None = None, photos: int | None = None, decoder: bool = True
) -> dict[str, Any]:
    """Per cut: k of n evaluation photos recovered (white-box at the default budget, decoder at
    `_blocks.3`), the bound and its verdict, re-identification and recognition counts, seconds."""
    from infenclave.assess.adversary import build_gallery
    from infenclave.assess.attacks import Budgets, run_attacks, training_photos
    from infenclave.assess.attacks.metrics import JudgePanel
    from infenclave.assess.photosets import offline_sets

    sets = offline_sets()
    panel = JudgePanel.for_model(model)
    evaluation = sets["evaluation"].images()
    if quick or photos:
        evaluation = dict(list(evaluation.items())[: 4 if quick else photos])
    gallery = build_gallery(model, panel, evaluation, sets)
    budgets = Budgets(whitebox_steps=5, whitebox_restarts=1, decoder_epochs=1) if quick else Budgets()
    out: dict[str, Any] = {
        "photos": len(evaluation),
        "gallery": len(gallery),
        "chance_per_photo": round(gallery.chance, 4),
        "budgets": budgets.to_dict(),
        "photo_sets": {k: {"photos": len(v.photos), "by_source": v.by_source()} for k, v in sets.items()},
        "cuts": [],
    }
    plan = ([("decoder", "chosen-inputs", ["_blocks.3"])] if decoder else []) + [
        ("whitebox", "knows-weights", cuts or EVIDENCE_CUTS)
    ]
    for attack, adversary, cuts in plan:
        training = training_photos(exclude=evaluation) if attack == "decoder" else None
        for cut in cuts:
            t0 = time.perf_counter()
            res = run_attacks(
                model, net, [cut], evaluation, adversary, budgets, panel, seed=0, gallery=gallery, training=training
            )
            (c,) = res.cuts
            ev = c.evidence
            out["cuts"].append(
                {
                    "attack": attack,
                    "cut": cut,
                    "photos_attacked": len(c.images),
                    "photos_planned": c.photos_planned,
                    "recovered": c.recovered_count,
                    "reidentified": c.reidentified_count,
                    "recognised": c.recognised_count,
                    "unclassifiable": sum(not r.classifiable for r in c.images),
                    "upper_bound": round(ev.bound, 4),
                    "verdict": ev.verdict,
                    "structural_ranks": [r.reid.structural_rank for r in c.images if r.reid],
                    "deep_ranks": [r.reid.deep_rank for r in c.images if r.reid],
                    "attack_seconds": round(c.attack_seconds, 1),
                    "wall_seconds": round(time.perf_counter() - t0, 1),
                }
            )
            print(json.dumps(out["cuts"][-1]), flush=True)
    return out


def convergence_run(
    model: Any,
    net: Any,
    quick: bool,
    photos: int = CONVERGENCE_PHOTOS,
    *,
    cut: str = CONVERGENCE_CUT,
    threads: int | None = None,
    save: Any = None,
) -> dict[str, Any]:
    """At the recommended cut: the default cap vs twice the cap, same photos and seeds.

    The claim to check: doubling the white-box budget does not raise the recovery rate there.
    Per cap: k of n recovered, the one-sided 95% bound and verdict, the Adam steps each restart
    used (a plateau stops it before the cap), seconds, and per photo whether it was recovered and
    its relative IR error. `save(doc)` is called after each cap so a long run keeps what it has.
    The photos are the background photos of the evaluation set (after the 8 built-in ones,
    which the judges know from ImageNet-like scenes), in the set's order.
    """
    from infenclave.assess.adversary import build_gallery
    from infenclave.assess.attacks import Budgets, run_attacks
    from infenclave.assess.attacks.evidence import judge_evidence
    from infenclave.assess.attacks.metrics import JudgePanel
    from infenclave.assess.attacks.whitebox import DEFAULT_STEPS
    from infenclave.assess.photosets import offline_sets

    sets = offline_sets()
    panel = JudgePanel.for_model(model)
    evaluation = dict(list(sets["evaluation"].images().items())[8 : 8 + (1 if quick else photos)])
    gallery = build_gallery(model, panel, evaluation, sets)
    doc: dict[str, Any] = {"cut": cut, "photos": [*evaluation], "gallery": len(gallery), "runs": []}
    for cap in [5, 10] if quick else [DEFAULT_STEPS, 2 * DEFAULT_STEPS]:
        t0 = time.perf_counter()
        res = run_attacks(
            model,
            net,
            [cut],
            evaluation,
            "knows-weights",
            Budgets(whitebox_steps=cap),
            panel,
            seed=0,
            gallery=gallery,
            stop_when_unsafe=False,
            threads=threads,
        )
        (c,) = res.cuts
        ev = judge_evidence(c.recovered_count, len(c.images))
        restarts = c.extra.get("restarts") or []
        doc["runs"].append(
            {
                "cap": cap,
                "restarts": restarts,
                "steps_used": sum(int(r["steps"]) for r in restarts),
                "steps_allowed": cap * len(restarts),
                "recovered": c.recovered_count,
                "reidentified": c.reidentified_count,
                "recognised": c.recognised_count,
                "photos": len(c.images),
                "upper_bound": round(ev.bound, 4),
                "verdict": ev.verdict,
                "mean_ir_error": round(float(np.mean([r.ir_error or 0.0 for r in c.images])), 4),
                "per_photo": {
                    r.image: {
                        "recovered": bool(r.unsafe),
                        "ir_error": round(float(r.ir_error), 4) if r.ir_error is not None else None,
                        "ssim": round(float(r.ssim), 4),
                    }
                    for r in c.images
                },
                "attack_seconds": round(c.attack_seconds, 1),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        print(json.dumps({k: v for k, v in doc["runs"][-1].items() if k != "per_photo"}), flush=True)
        if save is not None:
            save(doc)
    if len(doc["runs"]) == 2:
        base, doubled = doc["runs"]
        before = base["per_photo"]
        gained = [n for n, r in doubled["per_photo"].items() if r["recovered"] and not before[n]["recovered"]]
        doc["doubling_raises_recovery"] = doubled["recovered"] > base["recovered"]
        doc["recovered_only_at_double_cap"] = gained
    return doc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "attacks.json")
    ap.add_argument("--figure", type=Path, default=ROOT / "docs" / "img" / "inversion-example.png")
    ap.add_argument("--quick", action="store_true", help="tiny budgets and few cuts (a smoke run)")
    ap.add_argument("--evidence-cuts", default=None, help="comma-separated cuts for --parts evidence")
    ap.add_argument(
        "--photos",
        type=int,
        default=None,
        help="evaluation photos for evidence (default all 40) / convergence (default 4)",
    )
    ap.add_argument("--no-decoder", action="store_true", help="evidence: white-box only")
    ap.add_argument("--convergence-cut", default=CONVERGENCE_CUT, help="the cut for --parts convergence")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument(
        "--parts",
        default="cost,default,curves,figure",
        help="comma-separated sections to run: cost, default, curves, figure, evidence, convergence",
    )
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if not parts or parts - {"cost", "default", "curves", "figure", "evidence", "convergence"}:
        ap.error("--parts takes cost, default, curves, figure, evidence and/or convergence")

    from infenclave.assess.attacks import Judge, load_eval_images, training_photos
    from infenclave.assess.attacks.runner import torch_threads
    from infenclave.enclave.imaging import resize_and_crop
    from infenclave.models import load_model
    from infenclave.network import analyse

    started = time.perf_counter()
    model = load_model(MODEL)
    net = analyse(model)
    images = load_eval_images()
    judge = Judge.for_model(model)
    training = training_photos(exclude=images)
    batch = np.stack([resize_and_crop(v, model.preprocess) for v in images.values()])
    previous = json.loads(args.out.read_text()) if args.out.is_file() and not args.quick else {}
    report: dict[str, Any] = {
        **previous,
        "machine": {
            "cores": len(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "model": MODEL,
        "judge": judge.name,
        "training_photos": training.summary()["distinct_photos"],
    }
    with torch_threads(args.threads) as threads:
        report["machine"]["torch_threads"] = threads
        if "cost" in parts:
            print("per-cut cost", flush=True)
            report["per_cut_cost"] = per_cut_cost(net, batch, training, args.quick)
            report["load_average_after_cost"] = [round(v, 2) for v in os.getloadavg()]
        if "default" in parts:
            print("default run", flush=True)
            report["load_average_before_default"] = [round(v, 2) for v in os.getloadavg()]
            report["default_run"] = default_run(model, net, images, judge, args.quick)
            report["load_average_after_default"] = [round(v, 2) for v in os.getloadavg()]
        if "curves" in parts:
            print("budget curves", flush=True)
            report["budget_curves"] = budget_curves(net, images, judge, training, args.quick)
            report["load_average_after_curves"] = [round(v, 2) for v in os.getloadavg()]
        if "evidence" in parts:
            print("evidence per cut (evaluation set)", flush=True)
            report["evidence"] = evidence_run(
                model,
                net,
                args.quick,
                args.evidence_cuts.split(",") if args.evidence_cuts else None,
                args.photos,
                not args.no_decoder,
            )
            report["load_average_after_evidence"] = [round(v, 2) for v in os.getloadavg()]
            if not args.quick:  # a long run keeps what it has measured
                args.out.write_text(json.dumps(report, indent=2) + "\n")
        if "convergence" in parts:
            print("convergence at the deepest candidate cut", flush=True)

            def save(doc: dict[str, Any]) -> None:
                report["convergence"] = doc
                if not args.quick:
                    args.out.write_text(json.dumps(report, indent=2) + "\n")

            report["convergence"] = convergence_run(
                model,
                net,
                args.quick,
                args.photos or CONVERGENCE_PHOTOS,
                cut=args.convergence_cut,
                threads=args.threads,
                save=save,
            )
            report["load_average_after_convergence"] = [round(v, 2) for v in os.getloadavg()]
        if "figure" in parts and not args.quick:
            print("figure", flush=True)
            draw_figure(model, net, images, judge, args.figure)
            report["figure"] = str(args.figure.relative_to(ROOT))
    report.pop("load_average_at_end", None)
    report.pop("total_seconds", None)
    report.setdefault("seconds_by_run", []).append(
        {"parts": sorted(parts), "seconds": round(time.perf_counter() - started, 1)}
    )
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    else:
        print(json.dumps(report, indent=2)[:3000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
