"""Check the host's BackNet work against the IR1 this enclave sent (blocked Freivalds).

The host runs the BackNet and is an active attacker: it may return zeros, a permuted or
noisy IR2, one edited channel, or another request's IR2. It returns IR2 *and* the output of
every op that the enclave cannot recompute bit for bit (`protocol.backnet_verify.SENT_OPS`:
the linear ops' pre-activation outputs, the minimum that lets every element-wise op be
recomputed); the enclave walks the BackNet's op list from the IR1 it kept for this request:

1. Linear ops (Conv, incl. depthwise/grouped/strided; Gemm/MatMul as a 1x1 conv over rows),
   one check per *output channel* c, block of output rows (`ROW_BLOCKS`; a depthwise conv:
   the whole channel) and secret vector t (one entry per output position, random sign,
   magnitude in [1, 2]; `VECTORS`, depthwise `DEPTHWISE_VECTORS`): with ``y_c`` the host's
   channel, ``U = sum_{p in block} t_p x[window(p)]`` and ``b_c`` the bias,
   ``|sum_{p in block} t_p (y_cp - b_c) - sum W_c U| <= tol``. ``U`` costs one pass over the
   input (a depthwise conv uses ``conv_c^T(t)``, precomputed at load); nothing is convolved.
   The vectors come from a numpy Generator seeded from os.urandom at worker start; they are
   never written, sent or sealed.
2. Ops recomputed bit for bit from verified inputs (float32 IEEE results): Clip/ReLU, Add,
   Mul, zero Pad, Reshape/Flatten, MaxPool, Concat. The host does not send these; where IR2
   is one of them, the host's IR2 must equal the recomputed tensor exactly.
3. Ops recomputed with a rounding tolerance (each element): global average pool, Sigmoid,
   BatchNormalization (an unfolded one).
4. Any failed check raises `CheckFailed`; the program then fails the request and counts the
   failure against the manifest's ``max_failures``. A NaN or infinity anywhere in a sent
   tensor makes its block's projection NaN or infinite, which fails step 1 (the tolerance is
   computed from verified, finite inputs only).

Tolerance of step 1 (derivation in docs/serving.md, "Verified BackNet"): each honest output
is a float32 dot product of length K + 1 (K weights, the bias), any summation order, so
``|y_cp - exact| <= gamma_{K+1} z_cp`` with ``z_cp = sum |w||x| + |b_c|`` and
``gamma_n = n u / (1 - n u)``, ``u = 2^-24``. Projected with ``|t| <= 2`` a block's error
is at most ``2 gamma_{K+1} Z``, ``Z = sum_{p in block} z_cp`` (one pass: ``|W|`` against the
window sums of ``|x|``; dense ops take the largest block's sums for every block). The
enclave's own float32 sums add ``2 gamma_B Z`` each, B their length: one output row (Wo) for
``t . y`` and ``U``, K for ``W U``, the input channel (Q = H W) for a depthwise
``conv^T(t) . x``. ``tol = SAFETY * 2 gamma Z + (K + 4) P UNDERFLOW`` with
``gamma = 2 gamma_{K+1} + 2 gamma_{Wo+1}`` (dense) or ``gamma_{K+1} + gamma_Wo + gamma_{Q+1}``
(depthwise).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from infenclave.protocol.backnet_verify import SENT_OPS, VerifyOp, VerifySpec

__all__ = ["DEPTHWISE_VECTORS", "ROW_BLOCKS", "VECTORS", "BackNetVerifier", "CheckFailed"]

#: Secret vectors per linear op: each block is checked once per vector, and a wrong block
#: passes each with probability ~ tol / |t . error|, independently.
VECTORS = 2
#: A depthwise conv is checked per whole channel (its conv^T(t) is precomputed, input-sized,
#: per vector) and its tolerance is dominated by the enclave's own sum over the channel, so
#: it gets more vectors instead of row blocks (bench/verify.py: the one-edited-channel miss
#: probability of the worst depthwise layer goes from ~9e-4 at 2 vectors to ~4e-5 at 3).
DEPTHWISE_VECTORS = 3
#: Blocks of output rows per channel of a non-depthwise linear op, each checked on its own:
#: a block's tolerance covers only its own rows, so an edit confined to a channel meets
#: ROW_BLOCKS x VECTORS independent checks, each against a fraction of the channel's bound.
ROW_BLOCKS = 4
#: Unit roundoff of float32.
U32 = 2.0**-24
#: Magnitudes of t: bounded away from zero so that no output element goes unchecked (an
#: element edited by d moves its channel's projection by at least |d|).
S_MIN, S_MAX = 1.0, 2.0
#: Factor over the bound: covers the float64 steps (relative error ~1e-13), the float32
#: evaluation of Z_c itself (relative error <= gamma_B < 1e-4) and the (1 + gamma) factors
#: dropped above. Not covered: Winograd/FFT kernels or TF32 on the host (measure first).
SAFETY = 2.0
#: Absolute slack per product of a linear check for float32 underflow (each rounding below
#: 2^-126 errs by at most 2^-150; x2 for |t|, x2 for SAFETY, x2 for the enclave's own sums).
UNDERFLOW = 2.0**-147
#: Absolute slack of element-wise recomputations (Sigmoid's approximations, tiny values).
ELEMENT_ABS = 2.0**-20


def _gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


class CheckFailed(Exception):
    """The host's BackNet output does not match its input; `step` names the op (for the log)."""

    def __init__(self, step: str) -> None:
        super().__init__(step)
        self.step = step


@dataclass(frozen=True)
class _Projection:
    """Secrets and precomputed terms of one linear op (step 1)."""

    t: np.ndarray  # (Ho, Wo, V) float32, the secret vectors
    blocks: np.ndarray  # (nb, Ho) float64: 1 where output row h belongs to block b
    sb: np.ndarray  # (nb, Co, V) float64: b_c sum_{p in block} t_p
    pb: np.ndarray  # (Co,) float64: |b_c| times the positions of the largest block
    gamma: float  # gamma_{K+1} and the enclave's own float32 sums (module docstring)
    floor: float  # absolute slack for float32 underflow: (K + 4) P UNDERFLOW
    depthwise: bool
    w: np.ndarray  # depthwise: conv_c^T(t_v) (V, C, H, W); else W as (g, Co/g, Ci/g*kh*kw)
    w_abs: np.ndarray  # depthwise: conv_c^T(1) with |W| (C, H, W); else |W|


class BackNetVerifier:
    """Projections drawn at construction; `check` verifies one request's tensors."""

    def __init__(self, spec: VerifySpec, rng: np.random.Generator | None = None) -> None:
        rng = rng if rng is not None else np.random.default_rng(int.from_bytes(os.urandom(32), "big"))
        self.spec = spec
        self.sent_shapes = [spec.shape_of(t) for t in spec.sent]
        self._proj: dict[int, _Projection] = {}
        #: Largest |residual| / tolerance of the linear checks since the last reset (benches).
        self.last_margin = 0.0
        for index, op in enumerate(spec.ops):
            if op.op in ("conv", "linear"):
                self._proj[index] = _projection(op, spec.shape_of(op.inputs[0]), rng)

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
                if y.shape != op.shape:
                    raise CheckFailed(f"{step}: wrong shape")
                self._check_sent(index, op, args[0], y, step)
            else:
                y = _recompute(op, args)
                if tensor == spec.output and not np.array_equal(y, ir2):
                    raise CheckFailed(f"{step}: IR2 differs from the recomputed output")
            values.append(y)

    def _check_sent(self, index: int, op: VerifyOp, x: np.ndarray, y: np.ndarray, step: str) -> None:
        if op.op in ("conv", "linear"):  # Step 1
            residual, tol = self._residual(index, op, x, y)
            self.last_margin = max(self.last_margin, float(np.max(np.abs(residual) / tol)))
            if not (np.abs(residual) <= tol).all():  # NaN/inf in y: NaN/inf here, refused
                raise CheckFailed(f"{step}: projection check failed")
            return
        if not np.isfinite(y).all():  # Step 3
            raise CheckFailed(f"{step}: not finite")
        ref, scale = _reference(op, x)
        if not (np.abs(y - ref) <= SAFETY * scale + ELEMENT_ABS).all():
            raise CheckFailed(f"{step}: element-wise check failed")

    def _residual(self, index: int, op: VerifyOp, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(residual (nb, Co, V), tolerance (Co, 1)) of linear op *index*: step 1."""
        p = self._proj[index]
        x3, y3 = _as_chw(op, x), _as_chw(op, y)  # (Ci, H, W), (Co, Ho, Wo)
        lhs = _blocks(p, _rows_t(y3, p.t)) - p.sb  # (nb, Co, V): sum_{p in block} t_p (y_cp - b_c)
        if p.depthwise:  # one block per channel: sum_q conv_c^T(t)_q x_cq
            rhs = np.einsum("vchw,chw->cv", p.w, x3)[None]
            z = np.einsum("chw,chw->c", p.w_abs, np.abs(x3))
        else:
            u, a = _windows(op, x3, p)  # (Ci*kk, nb*V), (Ci*kk, 1): the largest block's sums of |x|
            g, co_g, k = p.w.shape
            rhs = np.matmul(p.w, u.reshape(g, k, -1)).reshape(g * co_g, len(p.blocks), -1).transpose(1, 0, 2)
            z = np.matmul(p.w_abs, a.reshape(g, k, 1)).reshape(-1)
        return lhs - rhs, (SAFETY * 2.0 * p.gamma * (z + p.pb) + p.floor)[:, None]

    def tolerance(self, index: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Tolerance of each output channel's blocks, (Co,) (benches and docs)."""
        return self._residual(index, self.spec.ops[index], x, y)[1][:, 0]


def _as_chw(op: VerifyOp, a: np.ndarray) -> np.ndarray:
    """A conv tensor (1, C, H, W) as (C, H, W); a linear one (..., N) as (N, 1, rows)."""
    if op.op == "conv":
        return a[0]
    return a.reshape(-1, a.shape[-1]).T[:, None, :]


def _rows_t(a: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per output row h, sum_w t_hw a_chw for a (C, Ho, Wo): (Ho, C, V), float32 sums of Wo terms."""
    return np.matmul(a.transpose(1, 0, 2), t)


def _blocks(p: _Projection, rows: np.ndarray) -> np.ndarray:
    """Per-row sums (Ho, C, ...) added into blocks in float64: (nb, C, ...)."""
    return (p.blocks @ rows.reshape(rows.shape[0], -1)).reshape(len(p.blocks), *rows.shape[1:])


def _windows(op: VerifyOp, x3: np.ndarray, p: _Projection) -> tuple[np.ndarray, np.ndarray]:
    """Per input channel and kernel offset k: U = sum_{p in block} t_p x[p s + k] (Ci*kk, nb*V)
    and A = the largest block's sum_{p in block} |x[p s + k]| (Ci*kk,)."""
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = (
        ((1, 1), (1, 1), (0, 0, 0, 0))
        if op.op == "linear"
        else (op.attrs["strides"], op.attrs["dilations"], op.attrs["pads"])
    )
    kh, kw = (1, 1) if op.op == "linear" else op.weights["weight"].shape[2:]
    ho, wo, v = p.t.shape
    if pt or pl or pb or pr:
        x3 = np.pad(x3, [(0, 0), (pt, pb), (pl, pr)])
    x_abs = np.abs(x3)
    u = np.empty((x3.shape[0], kh * kw, len(p.blocks), v), np.float32)
    a = np.empty((x3.shape[0], kh * kw), np.float32)
    ones = np.ones(wo, np.float32)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dh, i * dh + sh * (ho - 1) + 1, sh)
            cols = slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)
            u[:, i * kw + j] = _blocks(p, _rows_t(x3[:, rows, cols], p.t)).transpose(1, 0, 2)  # (Ci, nb, V)
            a[:, i * kw + j] = (p.blocks @ np.matmul(x_abs[:, rows, cols], ones).T).max(axis=0)
    return u.reshape(x3.shape[0] * kh * kw, -1), a.reshape(-1)


def _projection(op: VerifyOp, in_shape: tuple[int, ...], rng: np.random.Generator) -> _Projection:
    """Draw one op's secret vectors and precompute what its check needs."""
    w = op.weights["weight"].astype(np.float64)
    bias = op.weights.get("bias")
    b = np.zeros(w.shape[0]) if bias is None else bias.astype(np.float64).reshape(-1)
    if op.op == "conv":
        c_out, (ho, wo) = op.shape[1], op.shape[2:]
        g, c_in = op.attrs["group"], in_shape[1]
        if w.shape[0] != c_out or c_in != w.shape[1] * g or c_out % g:
            raise ValueError("conv weight does not fit its input and output")
        k = int(np.prod(w.shape[1:]))
    else:  # linear: y (..., N) = x (..., K) W^T + b, checked as a 1x1 conv over the rows
        if w.shape[0] != op.shape[-1] or in_shape[-1] != w.shape[1] or in_shape[:-1] != op.shape[:-1]:
            raise ValueError("linear weight does not fit its input and output")
        c_out, g, c_in, k = w.shape[0], 1, w.shape[1], w.shape[1]
        ho, wo = 1, int(np.prod(op.shape[:-1]))
    depthwise = op.op == "conv" and g == c_in == c_out and w.shape[1] == 1
    vectors = DEPTHWISE_VECTORS if depthwise else VECTORS
    sign = rng.choice([-1.0, 1.0], (ho, wo, vectors))
    t = (rng.uniform(S_MIN, S_MAX, (ho, wo, vectors)) * sign).astype(np.float32)
    t64 = t.astype(np.float64)
    floor = (k + 4) * ho * wo * UNDERFLOW
    if depthwise:  # one block per channel
        nb = 1
        s = t64.transpose(2, 0, 1)[:, None].repeat(c_out, axis=1)  # (V, Co, Ho, Wo)
        r = _conv_t(s, w, op.attrs, in_shape).astype(np.float32)
        q = _conv_t(np.ones((1, c_out, ho, wo)), np.abs(w), op.attrs, in_shape)[0].astype(np.float32)
        gamma = _gamma(k + 1) + _gamma(wo) + _gamma(in_shape[2] * in_shape[3] + 1)
    else:  # ROW_BLOCKS blocks of output rows per channel
        nb = min(ROW_BLOCKS, ho)
        wg = w.reshape(g, c_out // g, -1).astype(np.float32)  # (g, Co/g, Ci/g*kh*kw)
        r, q = wg, np.abs(wg)
        gamma = 2 * _gamma(k + 1) + 2 * _gamma(wo + 1)
    blocks = (np.arange(ho)[None, :] * nb // ho == np.arange(nb)[:, None]).astype(np.float64)  # (nb, Ho)
    sb = (blocks @ t64.sum(axis=1))[:, None, :] * b[None, :, None]  # (nb, Co, V)
    pb = blocks.sum(axis=1).max() * wo * np.abs(b)
    return _Projection(t, blocks, sb, pb, gamma, floor, depthwise, r, q)


def _conv_t(s: np.ndarray, w: np.ndarray, attrs: dict[str, Any], in_shape: tuple[int, ...]) -> np.ndarray:
    """Transposed convolution of *s* (m, Co, Ho, Wo) with *w* (Co, Ci/g, kh, kw): (m, Ci, H, W)."""
    m, c_out, h_out, w_out = s.shape
    _, c_in, h_in, w_in = in_shape
    g, (sh, sw), (dh, dw), (pt, pl, pb, pr) = attrs["group"], attrs["strides"], attrs["dilations"], attrs["pads"]
    kh, kw = w.shape[2:]
    if (h_in + pt + pb - dh * (kh - 1) - 1) // sh + 1 != h_out or (
        w_in + pl + pr - dw * (kw - 1) - 1
    ) // sw + 1 != w_out:
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
        lo, hi = (None if attrs[k] is None else np.float32(attrs[k]) for k in ("min", "max"))
        y = x if lo is None and hi is None else np.clip(x, lo, hi)
    elif kind == "pad":
        p = attrs["pads"]
        y = np.zeros(op.shape, np.float32)
        y[tuple(slice(p[i], p[i] + x.shape[i]) for i in range(4))] = x
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


def _maxpool(x: np.ndarray, attrs: dict[str, Any]) -> np.ndarray:
    (kh, kw), (sh, sw), (pt, pl, pb, pr) = attrs["kernel"], attrs["strides"], attrs["pads"]
    xp = np.pad(x, [(0, 0), (0, 0), (pt, pb), (pl, pr)], constant_values=-np.inf)
    h_out = (xp.shape[2] - kh) // sh + 1
    w_out = (xp.shape[3] - kw) // sw + 1
    y = np.full((*x.shape[:2], h_out, w_out), -np.inf, dtype=np.float32)
    for i in range(kh):
        for j in range(kw):
            np.maximum(y, xp[:, :, i : i + sh * (h_out - 1) + 1 : sh, j : j + sw * (w_out - 1) + 1 : sw], out=y)
    return y
