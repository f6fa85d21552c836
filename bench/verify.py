"""Verified BackNet bench: detection of forged BackNet outputs, false rejections, and cost.

    .venv/bin/python bench/verify.py [--trials 3000] [--honest 10000] [--out bench/results/verify.json]

In-process (the enclave's verifier and the host's ONNX Runtime BackNet, Lite0 cut after block
3 / Tail from the head conv). Each forged trial draws a fresh forgery (random permutation,
element, image pair, noise); the secret projections are drawn once per run, as in one worker.
Times are per request, one thread (OMP_NUM_THREADS=1, as the enclave runs).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=3000)
    parser.add_argument("--honest", type=int, default=10000)
    parser.add_argument("--out", default="bench/results/verify.json")
    args = parser.parse_args()

    from infenclave.enclave.imaging import prepare
    from infenclave.enclave.verify import BackNetVerifier, CheckFailed
    from infenclave.host.backnet import BackNet
    from infenclave.models import load_model
    from infenclave.network import analyse
    from infenclave.protocol.backnet_verify import parse_verify_file
    from infenclave.sample_images import builtin_images
    from infenclave.split import ternary_split
    from infenclave.verify_build import build_verification

    import onnxruntime as ort

    model = load_model("efficientnet-lite0")
    split = ternary_split(analyse(model), "_blocks.3", "_conv_head")
    raw, back = build_verification(split.back, split.front_end.shape)
    spec = parse_verify_file(raw)
    verifier = BackNetVerifier(spec)
    backnet = BackNet(back.SerializeToString(), threads=1)
    plain_back = BackNet(split.back.SerializeToString(), threads=1)
    front = ort.InferenceSession(split.front.SerializeToString(), providers=["CPUExecutionProvider"])
    tail = ort.InferenceSession(split.tail.SerializeToString(), providers=["CPUExecutionProvider"])
    images = builtin_images()
    ir1s = [front.run(None, {front.get_inputs()[0].name: prepare(p.read_bytes(), model.preprocess)})[0]
            for p in images.values()]
    honest = [backnet(x) for x in ir1s]
    rng = np.random.default_rng()

    def passes(ir1: np.ndarray, outs: list[np.ndarray]) -> bool:
        try:
            verifier.check(ir1, outs[0], outs[1:])
            return True
        except CheckFailed:
            return False

    def top5(ir2: np.ndarray) -> list[int]:
        scores = tail.run(None, {tail.get_inputs()[0].name: ir2})[0][0]
        return list(np.argsort(-scores)[:5])

    # Tolerance of each linear op on honest data (absolute), for the 10x edit.
    def forge(kind: str) -> tuple[np.ndarray, list[np.ndarray]]:
        i = int(rng.integers(len(ir1s)))
        outs = [y.copy() for y in honest[i]]
        if kind == "zeros":
            return ir1s[i], [np.zeros_like(y) for y in outs]
        if kind == "permutation":
            return ir1s[i], [y[:, rng.permutation(y.shape[1])] for y in outs]
        if kind == "edited_channel":
            t = int(rng.integers(1, len(outs)))
            c = int(rng.integers(outs[t].shape[1]))
            outs[t][:, c] += rng.normal(0, 1, outs[t][:, c].shape).astype(np.float32)
            return ir1s[i], outs
        if kind == "edited_element_10x_tol":
            t = int(rng.integers(1, len(outs)))
            op_index = spec.sent[t - 1] - 1
            x = _input_of(spec, op_index, ir1s[i], honest[i])
            tol = verifier.tolerance(op_index, x, outs[t]) if spec.ops[op_index].op in ("conv", "linear") else 1.0
            outs[t].flat[int(rng.integers(outs[t].size))] += np.float32(10 * tol * rng.choice([-1, 1]))
            return ir1s[i], outs
        j = (i + 1 + int(rng.integers(len(ir1s) - 1))) % len(ir1s)  # swap: another live request
        return ir1s[i], [y.copy() for y in honest[j]]

    results: dict = {"model": "efficientnet-lite0", "cut": ["_blocks.3", "_conv_head"],
                     "vectors_per_layer": 2, "attacks": {}}
    for kind in ("zeros", "permutation", "edited_channel", "edited_element_10x_tol", "swap"):
        missed = sum(passes(*forge(kind)) for _ in range(args.trials))
        results["attacks"][kind] = {"trials": args.trials, "missed": missed}
        print(kind, results["attacks"][kind], flush=True)

    # Honest requests: false rejections, and timings.
    rejected, t_back, t_ver, t_plain = 0, [], [], []
    for n in range(args.honest):
        x = ir1s[n % len(ir1s)]
        t0 = time.perf_counter()
        outs = backnet(x)
        t1 = time.perf_counter()
        rejected += not passes(x, outs)
        t2 = time.perf_counter()
        if n < 50:
            plain_back(x)
            t_plain.append(time.perf_counter() - t2)
        t_back.append(t1 - t0)
        t_ver.append(t2 - t1)
    extra_bytes = sum(y.nbytes for y in honest[0][1:])
    med = lambda v: float(np.median(v)) * 1e3  # noqa: E731
    results["honest"] = {"requests": args.honest, "false_rejections": rejected}
    results["cost_ms"] = {"backnet_unverified": med(t_plain), "backnet_with_outputs": med(t_back),
                          "verify": med(t_ver), "extra_transfer_bytes": extra_bytes,
                          "verify_share_of_backnet": med(t_ver) / med(t_plain)}
    print(results["honest"], results["cost_ms"], flush=True)

    # Gaussian noise swept across the tolerance: what passes keeps the top-5.
    sweep = []
    for sigma in (1e-6, 1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2):
        passed = kept = 0
        for _ in range(max(20, args.trials // 100)):
            i = int(rng.integers(len(ir1s)))
            # Noise on the last checked tensor (the head conv's output); IR2 (its Clip, which
            # the enclave recomputes exactly) follows from it as an honest host would compute it.
            noisy = [y.copy() for y in honest[i]]
            noisy[-1] = noisy[-1] + rng.normal(0, sigma, noisy[-1].shape).astype(np.float32)
            noisy[0] = np.clip(noisy[-1], 0, 6).astype(np.float32)
            if passes(ir1s[i], noisy):
                passed += 1
                kept += top5(noisy[0]) == top5(honest[i][0])
        sweep.append({"sigma": sigma, "passed": passed, "passed_with_same_top5": kept})
        print(sweep[-1], flush=True)
    results["noise_sweep"] = sweep
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


def _input_of(spec, op_index: int, ir1: np.ndarray, outs: list[np.ndarray]) -> np.ndarray:  # noqa: ANN001
    """The verified input of op *op_index* on honest data (recomputed through the op list)."""
    from infenclave.enclave.verify import SENT_OPS, _recompute

    values = [ir1]
    claimed = dict(zip(spec.sent, outs[1:]))
    claimed[spec.output] = outs[0]
    for index, op in enumerate(spec.ops[: op_index + 1]):
        if index == op_index:
            return values[op.inputs[0]]
        args = [values[i] for i in op.inputs]
        values.append(claimed[index + 1] if op.op in SENT_OPS else _recompute(op, args))
    raise AssertionError("unreachable")


if __name__ == "__main__":
    main()
