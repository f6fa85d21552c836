"""The partition plan (`plan.json`): a versioned, schema-validated record of an assessment.

`build_plan` turns a scan into the document; `validate_plan` checks a document against the
JSON schema shipped next to this module (`plan.schema.json`, every field described there);
`Plan.parse` is what a consumer (`infenclave partition`) uses: it validates, checks the
version, and returns the few typed facts a partition needs. A plan we write is validated
before it is written: a plan that does not match its own schema is a bug, never an output.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np

from infenclave.assess.kl import Oracle
from infenclave.assess.scan import CutResult, ScanResult
from infenclave.errors import AssessmentError
from infenclave.network import CutPoint, Network

PLAN_FORMAT = "infenclave-assessment-plan"
PLAN_VERSION = 2  # 2: statistical verdict, deployment, photo sets, label leakage
# `recommendation.verdict` values, for the CLI's exit codes (see attacks/evidence.py):
VERDICT_SAFE = "safe"  # a partition whose FrontNet end is supported by the evidence
VERDICT_NO_SAFE_CUT = "no-safe-cut"  # photos were recovered at every candidate cut
VERDICT_NOT_ENOUGH = "not-enough-evidence"  # nothing recovered, too few photos to say safe
VERDICT_PARTIAL = "partial"  # interrupted before a decision
RECOMMENDATION_VERDICTS = (VERDICT_SAFE, VERDICT_NO_SAFE_CUT, VERDICT_NOT_ENOUGH, VERDICT_PARTIAL)
DEPLOY_PARTITIONED = "partitioned"
DEPLOY_WHOLE_MODEL = "whole-model-in-enclave"  # no IR leaves the enclave: an empty BackNet
METHOD = "kl_oracle"  # key of this method in every `verdicts` mapping

PROJECTION_TEXT = (
    "Each feature map of the IR is min-max normalised to [0, 1] (a constant map becomes all "
    "zeros), resized bilinearly (half-pixel centres, no antialiasing) to the model's input "
    "size, replicated to 3 channels, scaled to pixel units 0-255, then normalised exactly as "
    "the oracle normalises a photo (mean/std, channel order, layout)."
)
SAFE_TEXT = (
    "p = softmax(model(x)); q_c = softmax(oracle(projection of feature map c)); "
    "delta(x) = KL(p || uniform). The cut point is safe for x when min over c of KL(p || q_c) "
    "> delta(x): no single feature map lets the oracle recover more of the prediction than "
    "a uniform guess would."
)
RECOMMEND_TEXT = (
    "The FrontNet ends at the first cut point that is safe for every sample image; "
    "IRs that are not (C, H, W) feature maps cannot be assessed by this method."
)


def schema() -> dict[str, Any]:
    """The plan's JSON schema (a fresh copy)."""
    doc: dict[str, Any] = json.loads(_schema_text())
    return doc


@lru_cache(maxsize=1)
def _schema_text() -> str:
    return resources.files("infenclave.assess").joinpath("plan.schema.json").read_text("utf-8")


def validate_plan(doc: Any) -> None:
    """Raise AssessmentError naming the first field that does not match the schema."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema(), format_checker=jsonschema.FormatChecker())
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise AssessmentError(f"plan does not match its schema at {where}: {e.message}")


@dataclass(frozen=True)
class Plan:
    """What a partition needs from a validated plan."""

    model_name: str
    weights_sha256: str
    front_end: str | None
    tail_start: str
    partial: bool
    doc: dict[str, Any]
    verdict: str = VERDICT_SAFE  # one of RECOMMENDATION_VERDICTS
    deployment: str = DEPLOY_PARTITIONED  # or DEPLOY_WHOLE_MODEL

    @classmethod
    def parse(cls, text: str | bytes) -> Plan:
        """Parse and validate a plan document (refuses other formats and versions)."""
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise AssessmentError(f"plan is not valid JSON ({exc.__class__.__name__})") from exc
        if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT:
            raise AssessmentError("not an infenclave assessment plan")
        if doc.get("version") != PLAN_VERSION:
            raise AssessmentError(
                f"plan version {doc.get('version')!r} is not supported (this infenclave reads version {PLAN_VERSION})"
            )
        validate_plan(doc)
        rec = doc["recommendation"]
        return cls(
            model_name=doc["model"]["name"],
            weights_sha256=doc["model"]["weights_sha256"],
            front_end=rec["front_end"],
            tail_start=rec["tail_start"],
            partial=doc["scan"]["partial"],
            doc=doc,
            verdict=rec["verdict"],
            deployment=rec["deployment"],
        )


# --- building a plan from a scan ---------------------------------------------------------------


def _f(v: float | None) -> float | None:
    return None if v is None else float(round(v, 6))


def _cost(net: Network, start: CutPoint | None, end: CutPoint | None) -> dict[str, int]:
    params, flops, peak = net.part_cost(start, end)
    return {"param_bytes": params, "flops": flops, "peak_activation_bytes": peak, "memory_bytes": params + peak}


def _ir_bytes(c: CutPoint) -> int:
    return int(np.prod(c.shape)) * 4


def _cut_record(cr: CutResult, result: ScanResult, net: Network) -> dict[str, Any]:
    c = cr.cut
    images: list[dict[str, Any]] = []
    safe_for_all = {"safe": True, "unsafe": False}.get(cr.status)
    if cr.images is not None:
        for im, res in zip(result.images, cr.images):
            images.append(
                {
                    "image": im.name,
                    "delta": _f(res.delta),
                    "min_kl": _f(res.min_kl),
                    "median_kl": _f(res.median_kl),
                    "min_channel": res.min_channel,
                    "channels_evaluated": res.evaluated,
                    "channels_deduplicated": res.deduplicated,
                    "complete": res.complete,
                    "safe": res.safe,
                    "metrics": {},
                }
            )
    mins = [r["min_kl"] for r in images if r["min_kl"] is not None]
    medians = [r["median_kl"] for r in images if r["median_kl"] is not None]
    return {
        "index": c.index,
        "name": c.name,
        "shape": list(c.shape),
        "ir_bytes": _ir_bytes(c),
        "assessable": cr.images is not None,
        "status": cr.status,
        "stopped_early": cr.stopped_early,
        "channels": c.shape[0] if cr.images is not None else 0,
        "safe_for_all": safe_for_all,
        "min_kl": _f(min(mins)) if mins else None,
        "median_kl": _f(float(np.median(medians))) if medians else None,
        "frontnet_cost": _cost(net, None, c),
        "images": images,
        "metrics": {},
        "verdicts": {METHOD: {"safe": safe_for_all}},
    }


def default_tail_start(net: Network) -> CutPoint:
    """The last feature-map cut point: global pool, classifier, softmax and labels follow it."""
    maps = [c for c in net.cuts if c.is_feature_map]
    if not maps:
        raise AssessmentError(f"{net.model.name}: no feature-map cut point to start the Tail at")
    return maps[-1]


def build_plan(
    result: ScanResult,
    net: Network,
    oracle: Oracle,
    *,
    tail_start: CutPoint,
    tail_start_source: str,
    created: dt.datetime | None = None,
    adversary: Any = None,
    label_leakage: dict[str, Any] | None = None,
    kl_oracle_note: str | None = None,
) -> dict[str, Any]:
    """The plan document of a finished (or interrupted) scan, validated against the schema."""
    from infenclave import __version__
    from infenclave.enclave.topk import top_k

    model = net.model
    created = created or dt.datetime.now(dt.UTC)
    rec = result.recommended
    warnings: list[str] = []
    images = []
    for i, im in enumerate(result.images):
        labels = oracle.model.labels if oracle.own_reference else model.labels  # whose p it is
        top = top_k(result.log_p[i], labels, 1, already_probabilities=False)[0]
        images.append(
            {
                "name": im.name,
                "source": im.source,
                "sha256": im.sha256,
                "top1": {"index": top.index, "label": top.label, "prob": _f(top.prob)},
                "delta": _f(float(result.delta[i])),
            }
        )
    cuts = [_cut_record(cr, result, net) for cr in result.cuts]
    attacked = adversary is not None and bool(adversary.attacks)
    if attacked:
        from infenclave.assess.adversary import cut_records

        per_cut = cut_records(adversary)
        for rec_doc in cuts:
            for attack, figures in per_cut.get(rec_doc["name"], {}).items():
                rec_doc["metrics"][attack] = figures
                rec_doc["verdicts"][attack] = {"safe": not figures["unsafe"], "verdict": figures["evidence"]["verdict"]}
            ev = adversary.evidence(rec_doc["name"])
            if ev is not None:  # all attacks together: what the recommendation uses
                rec_doc["verdicts"]["attacks"] = {"safe": ev.verdict == "safe", "verdict": ev.verdict, **ev.to_dict()}

    if attacked and adversary.results is not None:
        from infenclave.assess.attacks import Budgets

        used, full = adversary.results.budgets, Budgets()
        if (
            used.whitebox_steps < full.whitebox_steps
            or used.whitebox_restarts < full.whitebox_restarts
            or used.decoder_epochs < full.decoder_epochs
        ):
            warnings.append(
                f"Attack budgets below the defaults ({used.label()}; defaults: "
                f"{full.label()}): this assumes a weaker attacker, so any 'safe' here "
                "is weaker than the default assessment's."
            )
    if attacked and adversary.results is not None and adversary.results.training is not None:
        from infenclave.assess.attacks.decoder import DATA_FLOOR

        n_train = adversary.results.training["distinct_photos"]
        if n_train < DATA_FLOOR:
            warnings.append(
                f"The inverse network trained on {n_train} distinct photos (fewer than "
                f"{DATA_FLOOR}): its results are a lower bound on what an attacker "
                "with a large photo collection recovers; treat a chosen-inputs 'safe' "
                "as weaker than it reads."
            )
    if result.partial:
        warnings.append(
            "The scan was interrupted: cut points marked 'incomplete' or "
            "'not-scanned' were not decided; run again for a complete plan."
        )
    if result.mode == "early-stop" and any(cr.stopped_early for cr in result.cuts):
        warnings.append(
            "Early-stop mode: unsafe cut points stopped at their first revealing "
            "channel, so their min/median KL cover only the channels computed "
            "(use --full for every channel)."
        )
    if rec is not None:
        later_unsafe = [cr.cut.name for cr in result.cuts if cr.cut.index > rec.cut.index and cr.status == "unsafe"]
        if later_unsafe:
            warnings.append(
                f"Cut point(s) after the recommended one are unsafe by this method: "
                f"{', '.join(later_unsafe)}. The host computes every IR between the FrontNet "
                "end and the Tail start from IR1, so consider ending the FrontNet later."
            )

    chosen = adversary.front_end if attacked else (rec.cut if rec is not None else None)
    partition: dict[str, Any] | None = None
    confirmation = adversary.confirmation if attacked else None
    if attacked and chosen is None and confirmation is not None:
        reason = (
            f"{confirmation.cut} was chosen on the evaluation photos (fixed-sequence test under the "
            f"{adversary.name} adversary) but not confirmed on {len(confirmation.names)} photos "
            f"that took no part in choosing it: {confirmation.evidence.sentence()} > "
            f"{adversary.max_recovery:.0%}. Keep the whole model in the enclave."
        )
    elif attacked and chosen is None and adversary.verdict == "not-enough-evidence":
        reason = (
            f"Not enough evidence under the {adversary.name} adversary: no photo was "
            "recovered at the deepest candidate cut, but too few photos were attacked for "
            f"the recovery-rate bound to reach {adversary.max_recovery:.0%}; attack more "
            "photos (--attack-images) or keep the whole model in the enclave."
        )
    elif attacked and chosen is None:
        reason = f"No cut point was safe under the {adversary.name} adversary: " + (
            "the KL method found none."
            if rec is None
            else f"from the KL method's first safe cut {rec.cut.name} on, the deepest "
            f"candidate cut before the Tail was broken by {'/'.join(adversary.attacks)} "
            f"inversion, lacked evidence, or is unsafe by the KL method "
            f"(attacked: {', '.join(adversary.attacked)}). Keep the whole model in the "
            "enclave."
        )
    elif chosen is None:
        reason = "No cut point was safe for every image in this scan"
        if result.partial:
            reason += " (the scan was interrupted)."
        else:
            last = [cr for cr in result.cuts if cr.status in ("safe", "unsafe")][-1:]
            blocking = [im.name for cr in last for im, r in zip(result.images, cr.images or []) if r.safe is False]
            reason += (
                f"; still unsafe at the last cut point scanned, {last[0].cut.name}: {', '.join(blocking)}."
                if last and blocking
                else "."
            )
    elif chosen.index >= tail_start.index:
        reason = (
            f"The first cut point safe for every image, {chosen.name}, is not before the "
            f"Tail start {tail_start.name}: no BackNet would remain."
        )
        warnings.append(reason + " Choose a later --tail-start.")
    else:
        f = chosen
        ev = adversary.evidence(f.name) if attacked else None
        reason = (
            f"{f.name} is the first cut point where every sample image's minimum "
            f"KL(p || q_c) exceeds its delta"
            + (
                f" and, under a {adversary.name} adversary ({'/'.join(adversary.attacks)} "
                f"inversion), {ev.sentence()} <= {adversary.max_recovery:.0%}, tested "
                "deepest cut first"
                if attacked and ev is not None
                else ""
            )
            + (
                f", and confirmed on {len(confirmation.names)} photos that took no part in choosing "
                f"it: {confirmation.evidence.sentence()}"
                if confirmation is not None
                else ""
            )
            + f"; the Tail starts at {tail_start.name} "
            + (
                "(the last feature map before the classifier head)."
                if tail_start_source == "default"
                else "(as given with --tail-start)."
            )
        )
        partition = {
            "frontnet": {"start": None, "end": f.name, "runs_in": "enclave", "cost": _cost(net, None, f)},
            "backnet": {"start": f.name, "end": tail_start.name, "runs_in": "host", "cost": _cost(net, f, tail_start)},
            "tail": {"start": tail_start.name, "end": None, "runs_in": "enclave", "cost": _cost(net, tail_start, None)},
            "ir1": {"cut": f.name, "shape": list(f.shape), "bytes": _ir_bytes(f)},
            "ir2": {"cut": tail_start.name, "shape": list(tail_start.shape), "bytes": _ir_bytes(tail_start)},
        }
    first_safe = rec.cut.name if rec else None
    if result.partial:
        verdict = VERDICT_PARTIAL
    elif partition is not None:
        verdict = VERDICT_SAFE
    elif attacked and adversary.verdict == "not-enough-evidence":
        verdict = VERDICT_NOT_ENOUGH
    else:
        verdict = VERDICT_NO_SAFE_CUT
    deployment = DEPLOY_PARTITIONED if partition is not None else DEPLOY_WHOLE_MODEL
    whole = _cost(net, None, None)
    front_flops = (
        partition["frontnet"]["cost"]["flops"] + partition["tail"]["cost"]["flops"] if partition else whole["flops"]
    )
    enclave = {
        "deployment": deployment,
        "cost": whole if partition is None else None,
        "flops_share_in_enclave": round(front_flops / max(1, whole["flops"]), 4),
        "note": (
            "Every layer runs in the enclave: no IR1 or IR2 leaves it (an empty "
            "BackNet). This costs the whole model's FLOPs and memory inside the TEE."
            if partition is None
            else "FrontNet and Tail run in the enclave; the BackNet on the host."
        ),
    }
    if partition is None and not result.partial:
        warnings.append(
            f"Recommended deployment: the whole model in the enclave "
            f"({_cost(net, None, None)['flops'] / 1e9:.2f} GFLOPs per image inside the TEE)."
        )
    doc: dict[str, Any] = {
        "format": PLAN_FORMAT,
        "version": PLAN_VERSION,
        "created_utc": created.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "tool": {"name": "infenclave", "version": __version__},
        "model": {
            "name": model.name,
            "source": model.source or model.name,
            "weights_sha256": model.weights_sha256,
            "output": model.output,
            "num_classes": model.num_classes,
            "input_shape": list(net.input_shape[1:]),
        },
        "preprocess": model.preprocess.to_dict(),
        "oracle": {
            "name": oracle.model.name,
            "source": oracle.model.source or oracle.model.name,
            "weights_sha256": oracle.model.weights_sha256,
            "same_as_model": oracle.same_as_model,
            **({"note": oracle.note} if oracle.note else {}),
        },
        "method": {
            "name": "kl-oracle",
            "projection": PROJECTION_TEXT,
            "safe_rule": SAFE_TEXT,
            "recommendation_rule": RECOMMEND_TEXT,
        },
        "images": images,
        "scan": {"mode": result.mode, "seed": result.seed, "partial": result.partial, "stats": result.stats.to_dict()},
        "cuts": cuts,
        "verdicts": {
            METHOD: {
                "first_safe_cut": first_safe,
                "summary": (
                    f"First cut point safe for all {len(images)} image(s): {first_safe}."
                    if first_safe
                    else "No cut point safe for every image in this scan."
                ),
            }
        },
        "recommendation": {
            "front_end": chosen.name if chosen is not None else None,
            "tail_start": tail_start.name,
            "tail_start_source": tail_start_source,
            "reason": reason,
            "verdict": verdict,
            "deployment": deployment,
        },
        "enclave": enclave,
        "partition": partition,
        "warnings": warnings,
        "adversary": (
            adversary.to_plan()
            if adversary is not None
            else {"name": "passive", "attacks": [], "front_end": first_safe, "attacked_cuts": []}
        ),
    }
    if label_leakage is not None:
        doc["label_leakage"] = label_leakage
        if label_leakage.get("recommended_tail_start") is None:
            warnings.append("Label leakage: " + label_leakage["summary"])
        elif label_leakage["recommended_tail_start"] != tail_start.name:
            warnings.append(
                f"Label leakage: the Tail start {tail_start.name} lets the host name "
                f"the label; start the Tail at {label_leakage['recommended_tail_start']} "
                "(within 5 points of chance)."
            )
    if kl_oracle_note is not None:
        doc["oracle"]["note"] = kl_oracle_note
    if attacked:
        doc["verdicts"]["attacks"] = {
            "first_safe_cut": adversary.front_end.name if adversary.front_end else None,
            "summary": (
                f"Under the {adversary.name} adversary the first cut point safe by both the "
                f"KL method and {'/'.join(adversary.attacks)} inversion is "
                f"{adversary.front_end.name if adversary.front_end else 'none'}."
            ),
        }
    validate_plan(doc)
    return doc


CSV_COLUMNS = [
    "cut_index",
    "cut",
    "shape",
    "status",
    "image",
    "delta",
    "min_kl",
    "median_kl",
    "min_channel",
    "channels",
    "channels_evaluated",
    "channels_deduplicated",
    "complete",
    "safe",
]


def exposure_csv(doc: dict[str, Any]) -> str:
    """One row per (cut point, image); empty cells where a value does not exist."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    names = [im["name"] for im in doc["images"]]
    for cut in doc["cuts"]:
        by_image = {r["image"]: r for r in cut["images"]}
        for name in names:
            r = by_image.get(name, {})
            row = [
                cut["index"],
                cut["name"],
                "x".join(map(str, cut["shape"])),
                cut["status"],
                name,
                r.get("delta"),
                r.get("min_kl"),
                r.get("median_kl"),
                r.get("min_channel"),
                cut["channels"],
                r.get("channels_evaluated"),
                r.get("channels_deduplicated"),
                r.get("complete"),
                r.get("safe"),
            ]
            w.writerow(["" if v is None else str(v).lower() if isinstance(v, bool) else v for v in row])
    return out.getvalue()
