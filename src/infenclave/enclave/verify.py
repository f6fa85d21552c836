"""Check the host's BackNet work against the IR1 this enclave sent (Freivalds-style).

The host runs the BackNet and is an active attacker: it may return zeros, a permuted or
noisy IR2, or another request's IR2. It returns IR2 *and* the output of every op that the
enclave cannot recompute bit for bit (`protocol.backnet_verify.SENT_OPS`); the enclave walks
the BackNet's op list from the IR1 it kept for this request:

1. Linear ops (Conv, incl. depthwise/grouped; Gemm/MatMul): for each of `VECTORS` secret
   vectors s (one entry per output element, random sign, magnitude in [1, 2]), check
   ``<s, y - b> = <conv^T(s), x>``. ``conv^T(s)`` (`_conv_t`) is computed once at load, so a
   check costs O(input + output), not a convolution. The vectors come from a numpy Generator
   seeded from os.urandom at worker start; they are never written, sent or sealed.
2. Ops recomputed bit for bit from verified inputs (float32 IEEE results): Clip/ReLU, Add,
   Mul, zero Pad, Reshape/Flatten, MaxPool, Concat. The host does not send these; where IR2
   is one of them, the host's IR2 must equal the recomputed tensor exactly.
3. Ops recomputed with a rounding tolerance (each element): global average pool, Sigmoid,
   BatchNormalization (an unfolded one).
4. Any failed check (or NaN/inf) raises `CheckFailed`; the program then fails the request and
   counts the failure against the manifest's ``max_failures``.

Tolerances (derivation in docs/serving.md, "Verified BackNet"): a float32 dot product of
length K differs from the exact one by at most ``gamma_K * sum |w||x|``, ``gamma_K = K u /
(1 - K u)``, ``u = 2^-24``, and the bias add by ``u |y|``. Projected with ``|s| <= 2``:
``|<s, y_host - y_exact>| <= 2 (gamma_K <|W|^T 1, |x|> + u sum |y|)``; `SAFETY` covers
runtimes that sum in other orders or blocks. The enclave works in float64 (error ~2^-53).
"""

from __future__ import annotations

import os

import numpy as np

from infenclave.protocol.backnet_verify import SENT_OPS, VerifyOp, VerifySpec

__all__ = ["VECTORS", "BackNetVerifier", "CheckFailed"]

#: Secret projection vectors per linear op (a wrong output passes one with probability
#: ~tolerance / |<s, error>|, independently per vector).
VECTORS = 2
#: Unit roundoff of float32.
U32 = 2.0**-24
#: Magnitudes of s: bounded away from zero so that no output element goes unchecked.
S_MIN, S_MAX = 1.0, 2.0
#: Factor over the worst-case bound (other summation orders, blocked or Winograd kernels).
SAFETY = 4.0
#: Absolute slack of element-wise recomputations (Sigmoid's approximations, tiny values).
ELEMENT_ABS = 2.0**-20


class CheckFailed(Exception):
    """The host's BackNet output does not match its input; `step` names the op (for the log)."""

    def __init__(self, step: str) -> None:
        super().__init__(step)
        self.step = step


class BackNetVerifier:
    """Projections drawn at construction; `check` verifies one request's tensors."""

    def __init__(self, spec: VerifySpec, rng: np.random.Generator | None = None) -> None:
        rng = rng if rng is not None else np.random.default_rng(int.from_bytes(os.urandom(32), "big"))
        self.spec = spec
        self.sent_shapes = [spec.shape_of(t) for t in spec.sent]
        self._proj: dict[int, tuple] = {}
        #: Largest |residual| / tolerance of the linear checks since the last reset (benches).
        self.last_margin = 0.0
        for index, op in enumerate(spec.ops):
            in_shape = spec.shape_of(op.inputs[0])
            if op.op in ("conv", "linear"):
                self._proj[index] = _projection(op, in_shape, rng)

    def check(self, ir1: np.ndarray, ir2: np.ndarray, sent: list[np.ndarray]) -> None:
        """Raise `CheckFailed` unless *ir2* and *sent* are the BackNet's output on *ir1*."""
        spec = self.spec
        values: list[np.ndarray] = [ir1]
        claimed = dict(zip(spec.sent, sent))
        claimed[spec.output] = ir2
        for index, op in enumerate(spec.ops):
            tensor = index + 1
            step = f"op {index} ({op.op})"
            args = [values[i] for i in op.inputs]
            if op.op in SENT_OPS:
                y = claimed[tensor]
                if y.shape != op.shape or not np.isfinite(y).all():
                    raise CheckFailed(f"{step}: wrong shape or not finite")
                self._check_sent(index, op, args[0], y, step)
            else:
                y = _recompute(op, args)
                if tensor == spec.output and not np.array_equal(y, ir2):
                    raise CheckFailed(f"{step}: IR2 differs from the recomputed output")
            values.append(y)

    def _check_sent(self, index: int, op: VerifyOp, x: np.ndarray, y: np.ndarray, step: str) -> None:
        if op.op in ("conv", "linear"):  # Step 1
            s, r, q, sb, k, r_max = self._proj[index]
            x64, y64 = x.reshape(-1).astype(np.float64), y.reshape(-1).astype(np.float64)
            x_abs = np.abs(x64)
            lhs = s @ y64 - sb  # (VECTORS,)
            rhs = r @ x64
            gamma = k * U32 / (1 - k * U32)
            bound = S_MAX * (gamma * float(q @ x_abs) + U32 * float(np.abs(y64).sum()))
            tol = SAFETY * bound + 2.0**-40 * r_max * float(x_abs.sum())
            self.last_margin = max(self.last_margin, float(np.abs(lhs - rhs).max() / tol))
            if not (np.abs(lhs - rhs) <= tol).all():
                raise CheckFailed(f"{step}: projection check failed")
            return
        ref, scale = _reference(op, x)  # Step 3
        if not (np.abs(y - ref) <= SAFETY * scale + ELEMENT_ABS).all():
            raise CheckFailed(f"{step}: element-wise check failed")

    def tolerance(self, index: int, x: np.ndarray, y: np.ndarray) -> float:
        """The projection tolerance of linear op *index* on (x, y) (for benches and docs)."""
        s, r, q, sb, k, _ = self._proj[index]
        x64, y64 = x.reshape(-1).astype(np.float64), y.reshape(-1).astype(np.float64)
        gamma = k * U32 / (1 - k * U32)
        return SAFETY * S_MAX * (gamma * float(q @ np.abs(x64)) + U32 * float(np.abs(y64).sum()))


def _projection(op: VerifyOp, in_shape: tuple[int, ...], rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """(s, W^T s, |W|^T 1, <s, b>, reduction length) for one linear op."""
    n_out = int(np.prod(op.shape))
    s = rng.uniform(S_MIN, S_MAX, (VECTORS, n_out)) * rng.choice([-1.0, 1.0], (VECTORS, n_out))
    w = op.weights["weight"].astype(np.float64)
    bias = op.weights.get("bias")
    if op.op == "conv":
        c_out = op.shape[1]
        if w.shape[0] != c_out or in_shape[1] != w.shape[1] * op.attrs["group"]:
            raise ValueError("conv weight does not fit its input and output")
        r = _conv_t(s.reshape(VECTORS, *op.shape[1:]), w, op.attrs, in_shape)
        q = _conv_t(np.ones((1, *op.shape[1:])), np.abs(w), op.attrs, in_shape)
        k = int(np.prod(w.shape[1:]))
        b_full = np.zeros(op.shape[1:]) + (0.0 if bias is None else bias.reshape(-1, 1, 1))
    else:  # linear: y (..., N) = x (..., K) W^T + b
        if w.shape[0] != op.shape[-1] or in_shape[-1] != w.shape[1] or in_shape[:-1] != op.shape[:-1]:
            raise ValueError("linear weight does not fit its input and output")
        rows = n_out // w.shape[0]
        r = (s.reshape(VECTORS, rows, -1) @ w).reshape(VECTORS, 1, -1)
        q = (np.ones((1, rows, w.shape[0])) @ np.abs(w)).reshape(1, 1, -1)
        k = w.shape[1]
        b_full = np.zeros(op.shape) + (0.0 if bias is None else bias)
    sb = s @ b_full.reshape(-1)
    r = r.reshape(VECTORS, -1)
    return s, r, q.reshape(-1), sb, k, float(np.abs(r).max(initial=0.0))


def _conv_t(s: np.ndarray, w: np.ndarray, attrs: dict, in_shape: tuple[int, ...]) -> np.ndarray:
    """Transposed convolution of *s* (m, Co, Ho, Wo) with *w* (Co, Ci/g, kh, kw): (m, Ci, H, W)."""
    m, c_out, h_out, w_out = s.shape
    _, c_in, h_in, w_in = in_shape
    g, (sh, sw), (dh, dw), (pt, pl, pb, pr) = attrs["group"], attrs["strides"], attrs["dilations"], attrs["pads"]
    kh, kw = w.shape[2:]
    if (h_in + pt + pb - dh * (kh - 1) - 1) // sh + 1 != h_out or \
            (w_in + pl + pr - dw * (kw - 1) - 1) // sw + 1 != w_out:
        raise ValueError("conv output shape does not follow from its attributes")
    r = np.zeros((m, c_in, h_in + pt + pb, w_in + pl + pr))
    sg = s.reshape(m, g, c_out // g, h_out * w_out)  # (m, g, Co/g, P)
    for i in range(kh):
        for j in range(kw):
            wij = w[:, :, i, j].reshape(g, c_out // g, c_in // g).transpose(0, 2, 1)  # (g, Ci/g, Co/g)
            part = np.matmul(wij[None], sg).reshape(m, c_in, h_out, w_out)
            r[:, :, i * dh : i * dh + sh * (h_out - 1) + 1 : sh, j * dw : j * dw + sw * (w_out - 1) + 1 : sw] += part
    return r[:, :, pt : pt + h_in, pl : pl + w_in]


def _recompute(op: VerifyOp, args: list[np.ndarray]) -> np.ndarray:
    """Step 2: ops whose float32 result is exact (IEEE), so equal to the host's bit for bit."""
    x = args[0]
    kind, attrs = op.op, op.attrs
    if kind in ("add", "mul"):
        other = args[1] if len(args) > 1 else op.weights["const"]
        y = np.add(x, other) if kind == "add" else np.multiply(x, other)
    elif kind == "clip":
        y = x
        if attrs["min"] is not None:
            y = np.maximum(y, np.float32(attrs["min"]))
        if attrs["max"] is not None:
            y = np.minimum(y, np.float32(attrs["max"]))
    elif kind == "pad":
        p = attrs["pads"]
        y = np.pad(x, [(p[i], p[i + 4]) for i in range(4)])
    elif kind == "reshape":
        y = x.reshape(op.shape)
    elif kind == "maxpool":
        y = _maxpool(x, attrs)
    elif kind == "concat":
        y = np.concatenate(args, axis=attrs["axis"])
    else:
        raise ValueError(f"op {kind} is not recomputed")
    if y.shape != op.shape or y.dtype != np.float32:
        raise CheckFailed(f"{kind}: recomputed shape or type differs from the file")
    return y


def _reference(op: VerifyOp, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step 3: (float64 reference, error scale) of an op checked with a rounding tolerance."""
    x64 = x.astype(np.float64)
    if op.op == "gap":  # mean of n values: error <= gamma_n mean |x|
        n = x.shape[2] * x.shape[3]
        return x64.mean(axis=(2, 3), keepdims=True), (n + 2) * U32 * np.abs(x64).mean(axis=(2, 3), keepdims=True)
    if op.op == "sigmoid":
        ref = 1.0 / (1.0 + np.exp(-x64))
        return ref, 8 * U32 * ref
    # batchnorm: (x - mean) / sqrt(var + eps) * scale + bias, a handful of roundings
    shape = (1, -1) + (1,) * (x.ndim - 2)
    w = {k: v.astype(np.float64).reshape(shape) for k, v in op.weights.items()}
    a = w["scale"] / np.sqrt(w["var"] + op.attrs["epsilon"])
    ref = (x64 - w["mean"]) * a + w["bias"]
    return ref, 8 * U32 * (np.abs(x64 - w["mean"]) * np.abs(a) + np.abs(w["mean"] * a) + np.abs(w["bias"]))


def _maxpool(x: np.ndarray, attrs: dict) -> np.ndarray:
    (kh, kw), (sh, sw), (pt, pl, pb, pr) = attrs["kernel"], attrs["strides"], attrs["pads"]
    xp = np.pad(x, [(0, 0), (0, 0), (pt, pb), (pl, pr)], constant_values=-np.inf)
    h_out = (xp.shape[2] - kh) // sh + 1
    w_out = (xp.shape[3] - kw) // sw + 1
    y = np.full((*x.shape[:2], h_out, w_out), -np.inf, dtype=np.float32)
    for i in range(kh):
        for j in range(kw):
            np.maximum(y, xp[:, :, i : i + sh * (h_out - 1) + 1 : sh, j : j + sw * (w_out - 1) + 1 : sw], out=y)
    return y
