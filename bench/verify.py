"""Verified BackNet bench: detection of forged BackNet outputs, false rejections, and cost.

    nice .venv/bin/python bench/verify.py [--trials 3000] [--honest 10000] [--out bench/results/verify.json]

In-process (the enclave's verifier and the host's ONNX Runtime BackNet, Lite0 cut after block
3 / Tail from the head conv). Requests are honest IR1s from the 8 built-in photos under random
augmentation (crop, flip, small rotation, brightness/contrast/colour jitter), each run through
the FrontNet and the BackNet once; what is measured is the enclave's check alone. Each forged
trial draws a fresh request from a pool of such IR1s and a fresh forgery (random permutation,
tensor, channel, element, request pair, noise); the secret projections are drawn once per run,
as in one worker. For the one-edited-channel attack the bench also reports the probability
that the check misses it, computed from the tolerance and the secret vectors (the residual of
a channel edited with N(0, 1) noise is Gaussian given the vectors), summed over the trials.
Times are per request, one thread (OMP_NUM_THREADS=1, as the enclave runs); the share of
end-to-end latency is against FrontNet + BackNet + check + Tail in-process (no HTTP, no HPKE:
bench/serve.py has the served figures with verification on and off).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

ATTACKS = ("zeros", "permutation", "edited_channel", "edited_element_10x_tol", "swap")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=3000)
    parser.add_argument("--honest", type=int, default=10000)
    parser.add_argument("--pool", type=int, default=64, help="honest requests the forgeries start from")
    parser.add_argument("--out", default="bench/results/verify.json")
    args = parser.parse_args()

    import onnxruntime as ort
    from PIL import Image, ImageEnhance

    from infenclave.enclave.imaging import prepare
    from infenclave.enclave.verify import ROW_BLOCKS, SAFETY, VECTORS, BackNetVerifier, CheckFailed
    from infenclave.host.backnet import BackNet
    from infenclave.models import load_model
    from infenclave.network import analyse
    from infenclave.protocol.backnet_verify import SENT_OPS, parse_verify_file
    from infenclave.sample_images import builtin_images
    from infenclave.split import ternary_split
    from infenclave.verify_build import build_verification

    model = load_model("efficientnet-lite0")
    split = ternary_split(analyse(model), "_blocks.3", "_conv_head")
    raw, back = build_verification(split.back, split.front_end.shape)
    spec = parse_verify_file(raw)
    t0 = time.perf_counter()
    verifier = BackNetVerifier(spec)
    load_ms = (time.perf_counter() - t0) * 1e3
    backnet = BackNet(back.SerializeToString(), threads=1)
    plain_back = BackNet(split.back.SerializeToString(), threads=1)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    front = ort.InferenceSession(split.front.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    tail = ort.InferenceSession(split.tail.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    photos = [Image.open(p).convert("RGB") for p in builtin_images().values()]
    for im in photos:
        im.thumbnail((512, 512))  # the model sees 224x224: larger photos only cost time here
    rng = np.random.default_rng()

    def augmented() -> bytes:
        """One real photo under a random crop, flip, rotation and colour jitter (PNG bytes)."""
        im = photos[int(rng.integers(len(photos)))]
        w, h = im.size
        side = rng.uniform(0.5, 1.0)
        cw, ch = int(w * side), int(h * side * rng.uniform(0.8, 1.25))
        ch = min(ch, h)
        x0, y0 = int(rng.integers(w - cw + 1)), int(rng.integers(h - ch + 1))
        im = im.crop((x0, y0, x0 + cw, y0 + ch)).rotate(float(rng.uniform(-15, 15)))
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            im = enhance(im).enhance(float(rng.uniform(0.6, 1.4)))
        buf = io.BytesIO()
        im.save(buf, format="PNG", compress_level=0)
        return buf.getvalue()

    def ir1_of(data: bytes) -> np.ndarray:
        x = prepare(data, model.preprocess)
        return front.run(None, {front.get_inputs()[0].name: x})[0]

    def passes(ir1: np.ndarray, outs: list[np.ndarray]) -> bool:
        try:
            verifier.check(ir1, outs[0], outs[1:])
            return True
        except CheckFailed:
            return False

    def top5(ir2: np.ndarray) -> list[int]:
        scores = tail.run(None, {tail.get_inputs()[0].name: ir2})[0][0]
        return [int(i) for i in np.argsort(-scores)[:5]]

    pool = [ir1_of(augmented()) for _ in range(args.pool)]
    honest = [backnet(x) for x in pool]
    values = [_values(spec, SENT_OPS, x, outs) for x, outs in zip(pool, honest)]
    miss_probability = 0.0

    def forge(kind: str) -> tuple[np.ndarray, list[np.ndarray]]:
        nonlocal miss_probability
        i = int(rng.integers(len(pool)))
        outs = [y.copy() for y in honest[i]]
        if kind == "zeros":
            return pool[i], [np.zeros_like(y) for y in outs]
        if kind == "permutation":
            return pool[i], [y[:, rng.permutation(y.shape[1])] for y in outs]
        if kind in ("edited_channel", "edited_element_10x_tol"):
            t = int(rng.integers(1, len(outs)))  # a sent intermediate (IR2 itself is compared exactly)
            op_index = spec.sent[t - 1] - 1
            c = int(rng.integers(outs[t].shape[1]))
            if kind == "edited_channel":
                outs[t][:, c] += rng.normal(0, 1, outs[t][:, c].shape).astype(np.float32)
                miss_probability += _miss_probability(verifier, op_index, values[i], c)
            else:
                x = values[i][spec.ops[op_index].inputs[0]]
                tol = float(verifier.tolerance(op_index, x, outs[t])[c])
                e = int(rng.integers(outs[t][0, c].size))
                outs[t][0, c].flat[e] += np.float32(10 * tol * rng.choice([-1, 1]))
            return pool[i], outs
        j = (i + 1 + int(rng.integers(len(pool) - 1))) % len(pool)  # swap: another live request
        return pool[i], [y.copy() for y in honest[j]]

    results: dict = {
        "model": "efficientnet-lite0",
        "cut": ["_blocks.3", "_conv_head"],
        "vectors_per_check": VECTORS,
        "row_blocks_per_channel": ROW_BLOCKS,
        "safety": SAFETY,
        "attacks": {},
    }
    for kind in ATTACKS:
        missed = sum(passes(*forge(kind)) for _ in range(args.trials))
        results["attacks"][kind] = {"trials": args.trials, "missed": missed}
        if kind == "edited_channel":
            results["attacks"][kind]["expected_misses_from_the_tolerance"] = miss_probability
        print(kind, results["attacks"][kind], flush=True)

    # Honest requests: false rejections (each a fresh augmented photo), and the honest margin.
    verifier.last_margin = 0.0
    rejected = 0
    for n in range(args.honest):
        x = ir1_of(augmented())
        rejected += not passes(x, backnet(x))
        if (n + 1) % 1000 == 0:
            print(f"honest {n + 1}: {rejected} rejected, margin {verifier.last_margin:.2e}", flush=True)
    results["honest"] = {
        "requests": args.honest,
        "false_rejections": rejected,
        "largest_residual_over_tolerance": verifier.last_margin,
    }

    # Cost: medians over the pool, one thread; the check split into linear ops and the rest.
    results["cost"] = _cost(
        verifier,
        spec,
        SENT_OPS,
        pool,
        honest,
        backnet,
        plain_back,
        front,
        tail,
        [prepare(augmented(), model.preprocess) for _ in range(8)],
    )
    results["cost"]["verifier_load_ms"] = load_ms
    print(results["honest"], results["cost"], flush=True)

    # Gaussian noise on the head conv's output, swept across its tolerance: what passes must
    # keep the top-5. IR2 (its Clip, recomputed exactly) follows as an honest host computes it.
    head = spec.sent[-1] - 1
    tol_head = float(np.median(verifier.tolerance(head, values[0][spec.ops[head].inputs[0]], honest[0][-1])))
    sweep = []
    for sigma in (1e-6, 1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1):
        passed = kept = 0
        trials = max(20, args.trials // 100)
        for _ in range(trials):
            i = int(rng.integers(len(pool)))
            noisy = [y.copy() for y in honest[i]]
            noisy[-1] = noisy[-1] + rng.normal(0, sigma, noisy[-1].shape).astype(np.float32)
            noisy[0] = np.clip(noisy[-1], np.float32(0), np.float32(6))
            if passes(pool[i], noisy):
                passed += 1
                kept += top5(noisy[0]) == top5(honest[i][0])
        sweep.append(
            {
                "sigma": sigma,
                "sigma_x_sqrt_p_over_median_channel_tol": sigma * math.sqrt(49) / tol_head,
                "trials": trials,
                "passed": passed,
                "passed_with_same_top5": kept,
            }
        )
        print(sweep[-1], flush=True)
    results["noise_sweep"] = sweep
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


def _values(spec, sent_ops, ir1: np.ndarray, outs: list[np.ndarray]) -> list[np.ndarray]:
    """Every tensor of the op list on honest data (sent ones as sent, the rest recomputed)."""
    from infenclave.enclave.verify import _recompute

    values = [ir1]
    claimed = dict(zip(spec.sent, outs[1:]))
    claimed[spec.output] = outs[0]
    for index, op in enumerate(spec.ops):
        args = [values[i] for i in op.inputs]
        values.append(claimed[index + 1] if op.op in sent_ops else _recompute(op, args))
    return values


def _miss_probability(verifier, op_index: int, values: list[np.ndarray], c: int) -> float:
    """P(every check of channel c passes) when the channel gets N(0, 1) noise on every element.

    Given the secret vectors t, block b's residual is N(0, sum_{p in b} t_p^2) (plus the honest
    residual, < 1% of the tolerance); the vectors' residuals are nearly independent.
    """
    op = verifier.spec.ops[op_index]
    p = verifier._proj[op_index]
    tol = float(verifier.tolerance(op_index, values[op.inputs[0]], values[op_index + 1])[c])
    var = p.blocks @ (p.t.astype(np.float64) ** 2).sum(axis=1)  # (nb, V)
    return float(np.prod([math.erf(tol / math.sqrt(2 * s)) for s in var.ravel()]))


def _median_ms(fn, n: int) -> float:
    times = []
    for k in range(n):
        t0 = time.perf_counter()
        fn(k)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def _cost(verifier, spec, sent_ops, pool, honest, backnet, plain_back, front, tail, inputs) -> dict:
    import infenclave.enclave.verify as v

    n = 3 * len(pool)
    pick = lambda k: k % len(pool)  # noqa: E731
    check = _median_ms(lambda k: verifier.check(pool[pick(k)], honest[pick(k)][0], honest[pick(k)][1:]), n)
    back_plain = _median_ms(lambda k: plain_back(pool[pick(k)]), n)
    back_out = _median_ms(lambda k: backnet(pool[pick(k)]), n)
    front_ms = _median_ms(lambda k: front.run(None, {front.get_inputs()[0].name: inputs[k % len(inputs)]}), n)
    tail_ms = _median_ms(lambda k: tail.run(None, {tail.get_inputs()[0].name: honest[pick(k)][0]}), n)
    # Breakdown: time inside the linear-op checks (step 1) vs the rest (recomputation, walk).
    spent = [0.0]
    original = v.BackNetVerifier._residual

    def timed(self, *a):
        t0 = time.perf_counter()
        try:
            return original(self, *a)
        finally:
            spent[0] += time.perf_counter() - t0

    v.BackNetVerifier._residual = timed
    t0 = time.perf_counter()
    try:
        for k in range(n):
            verifier.check(pool[pick(k)], honest[pick(k)][0], honest[pick(k)][1:])
    finally:
        v.BackNetVerifier._residual = original
    total, linear = (time.perf_counter() - t0) / n * 1e3, spent[0] / n * 1e3
    sent_bytes = sum(y.nbytes for y in honest[0][1:])
    e2e = front_ms + back_out + check + tail_ms
    return {
        "check_ms": check,
        "check_ms_mean": total,
        "check_linear_ops_ms_mean": linear,
        "check_recompute_and_walk_ms_mean": total - linear,
        "backnet_unverified_ms": back_plain,
        "backnet_with_outputs_ms": back_out,
        "frontnet_ms": front_ms,
        "tail_ms": tail_ms,
        "check_share_of_backnet": check / back_plain,
        "check_share_of_in_process_end_to_end": check / e2e,
        "extra_transfer_bytes": sent_bytes,
        "sent_tensors": len(spec.sent),
        "linear_ops": sum(op.op in ("conv", "linear") for op in spec.ops),
        "threads": 1,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


if __name__ == "__main__":
    main()
