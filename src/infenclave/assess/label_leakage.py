"""Label leakage: how often the host can name the answer from IR2, the tensor the Tail starts at.

The Tail exists so that the host does not learn the label. It only helps if IR2 does not give
the label away:

- **public head** (knows-weights): the host runs the public weights from the Tail start to the
  output on IR2. For an unmodified public model this names the enclave's own top-1 for every
  input (measured: 8 of 8 with Lite0's head before this module existed), so for a public model
  the Tail protects nothing - the plan says so;
- **linear probe** (chosen-inputs): the host, as an ordinary client, submits its own photos,
  sees their IR2 and the answers, and fits a linear classifier (multinomial logistic
  regression on the globally pooled IR2) from the offline training photos' augmented views.
  With ~50 photos it can only learn the classes those photos show, so this is a lower bound
  on a host with a large photo collection.

Both are measured on every evaluation photo and LEAKAGE_VIEWS augmented views of each (>= 200
inputs), against chance (always guessing the most frequent answer), with exact one-sided 95%
Clopper-Pearson bounds. A Tail start is *near chance* when the upper bound is within
NEAR_CHANCE (5 points) of chance; the plan recommends the first such start, or says none is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from infenclave.assess.attacks.evidence import ALPHA, upper_bound
from infenclave.enclave.imaging import resize_and_crop
from infenclave.network import Network

NEAR_CHANCE = 0.05  # the "within 5 points of chance"
LEAKAGE_VIEWS = 5  # inputs per evaluation photo: the photo and 4 augmented views (40 x 5 = 200)
PROBE_VIEWS = 4  # augmented views per training photo for the probe (51 x 4 = 204 queries)
CANDIDATE_TAIL_STARTS = 3  # the last feature-map cuts are the Tail starts worth considering
PROBE_C = 1.0  # logistic regression's inverse regularisation (sklearn's default)


def lower_bound(k: int, n: int, alpha: float = ALPHA) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound (0 when k = 0)."""
    if k == 0 or n == 0:
        return 0.0
    from scipy.stats import beta

    return float(beta.ppf(alpha, k, n - k + 1))


def _views(photos: Mapping[str, np.ndarray], per_photo: int, hw: tuple[int, int], seed: int, pre: Any) -> np.ndarray:
    """Each photo at the model's crop, then per_photo - 1 augmented views: (N, H, W, 3) uint8."""
    from infenclave.assess.attacks.training_data import TrainingPhoto, augment

    rng = np.random.default_rng(seed)
    out = []
    for name, rgb in photos.items():
        out.append(resize_and_crop(rgb, pre)[None])
        if per_photo > 1:
            out.append(augment([TrainingPhoto(name, "", rgb)], per_photo - 1, hw, rng))
    return np.concatenate(out)


def _head(net: Network, start: str) -> Any:
    """The public weights from cut `start` to the output, on ONNX Runtime."""
    import onnx.utils

    from infenclave.enclave.onnx_runner import OnnxPart

    part = onnx.utils.Extractor(net.onnx_model).extract_model([net.cut(start).tensor], [net.output_name])
    return OnnxPart(part.SerializeToString(), threads=1)


def _row(tail: str, attacker: str, hits: int, n: int, chance: float) -> dict[str, Any]:
    ub = upper_bound(hits, n)
    return {
        "tail_start": tail,
        "attacker": attacker,
        "inputs": n,
        "named": hits,
        "rate": round(hits / n, 4),
        "lower_bound": round(lower_bound(hits, n), 4),
        "upper_bound": round(ub, 4),
        "chance": round(chance, 4),
        "near_chance": ub <= chance + NEAR_CHANCE,
    }


def measure(
    net: Network,
    eval_photos: Mapping[str, np.ndarray],
    training_photos: Mapping[str, np.ndarray] | None,
    *,
    tail_starts: Sequence[str] | None = None,
    public_head: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Label leakage per candidate Tail start (see the module docstring) -> the plan's section."""
    model = net.model
    pre = model.preprocess
    maps = [c.name for c in net.cuts if c.is_feature_map]
    starts = list(tail_starts) if tail_starts else maps[-CANDIDATE_TAIL_STARTS:]
    x_eval = _views(eval_photos, LEAKAGE_VIEWS, pre.input_hw, seed, pre)  # (N, H, W, 3)
    run = _multi(net, starts)  # one pass: every candidate IR2 and the enclave's own answer
    ir_eval, out_eval = run(x_eval)
    truth = np.argmax(out_eval, axis=1)
    n = len(truth)
    chance = float(np.bincount(truth).max() / n)
    ir_train: dict[str, np.ndarray] = {}
    y_train = None
    if training_photos:
        x_train = _views(training_photos, PROBE_VIEWS, pre.input_hw, seed + 1, pre)
        ir_train, out_train = run(x_train)
        y_train = np.argmax(out_train, axis=1)
    rows: list[dict[str, Any]] = []
    for start in starts:
        ir2 = ir_eval[start]  # (N, C, h, w): what the host holds
        if public_head:
            guess = np.argmax(_head(net, start)(ir2), axis=1)
            rows.append(_row(start, "public head (knows-weights)", int(np.sum(guess == truth)), n, chance))
        if y_train is not None:
            from sklearn.linear_model import LogisticRegression

            if len(set(y_train.tolist())) > 1:
                probe = LogisticRegression(C=PROBE_C, max_iter=500)
                probe.fit(_pool(ir_train[start]), y_train)
                guess = probe.predict(_pool(ir2))
            else:
                guess = np.full(n, y_train[0])
            rows.append(
                _row(start, "linear probe on own queries (chosen-inputs)", int(np.sum(guess == truth)), n, chance)
            )
    near = [r["tail_start"] for r in rows if all(q["near_chance"] for q in rows if q["tail_start"] == r["tail_start"])]
    recommended = near[0] if near else None
    worst = max(rows, key=lambda r: r["rate"]) if rows else None
    summary = (
        f"At {recommended} the host names the label within {NEAR_CHANCE:.0%} of chance."
        if recommended
        else "No candidate Tail start keeps the label near chance: "
        + (
            f"the host names the enclave's top-1 for {worst['rate']:.0%} of {n} inputs "
            f"({worst['attacker']}, at {worst['tail_start']}). "
            if worst
            else ""
        )
        + (
            "With public weights the Tail protects nothing: the host computes the label from IR2 itself."
            if public_head
            else ""
        )
    )
    return {
        "inputs": n,
        "views_per_photo": LEAKAGE_VIEWS,
        "chance": round(chance, 4),
        "near_chance_margin": NEAR_CHANCE,
        "rows": rows,
        "recommended_tail_start": recommended,
        "summary": summary,
    }


def _pool(ir: np.ndarray) -> np.ndarray:
    """(N, C, h, w) -> (N, C) globally pooled; (N, C) unchanged."""
    f = ir.mean(axis=(2, 3)) if ir.ndim == 4 else ir
    return np.asarray(f, np.float64)


def _multi(net: Network, starts: Sequence[str]) -> Any:
    """(N, H, W, 3) uint8 -> ({cut: IR}, output) from one ONNX Runtime pass over the model."""
    import onnx.utils
    import onnxruntime as ort

    from infenclave.enclave.imaging import normalise

    names = [net.cut(s).tensor for s in starts]
    part = onnx.utils.Extractor(net.onnx_model).extract_model([net.input_name], [*names, net.output_name])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(part.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    pre = net.model.preprocess

    def run(x: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        chunks = [sess.run(None, {net.input_name: normalise(x[i : i + 16], pre)}) for i in range(0, len(x), 16)]
        irs = {s: np.concatenate([c[k] for c in chunks]) for k, s in enumerate(starts)}
        return irs, np.concatenate([c[-1] for c in chunks])

    return run
