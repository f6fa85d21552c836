"""White-box inversion (the knows-weights adversary): regularised maximum-likelihood estimation.

The attacker holds the FrontNet weights (a public model, or one fine-tuned from public weights)
and observes the IR on the host. It searches for an image x in [0, 1] whose IR matches:

    minimise_x  ||F(normalise(x)) - y||^2 / ||y||^2  +  tv_weight * TV(x)

(He, Zhang and Lee, "Model inversion attacks against collaborative inference", ACSAC 2019.)
The IR term is relative, so one step size and one prior weight serve every cut point; the
total-variation prior stands in for "natural images are piecewise smooth" and is what makes
deep, many-to-one FrontNets invertible to something a person recognises.

How x is parametrised matters more than anything else for a fixed budget (measured on
Lite0, 3 photos, 100 Adam steps, `_blocks.3` / `_blocks.8`): x = sigmoid(C @ sum_k up(z_k)),
where z_k is a Laplacian-style pyramid of logits at 1/1 .. 1/32 of the input size, upsampled
bilinearly and summed, and C maps decorrelated colour to RGB (the ImageNet colour-correlation
square root used by Lucid's feature visualisation). The pyramid lets Adam move low
frequencies as fast as high ones (relative IR error 0.073 vs 0.148 for per-pixel logits at
`_blocks.3`: the per-pixel version needs more than twice the steps), and the colour
decorrelation removes most of the rainbow noise deep cuts otherwise produce (SSIM 0.14-0.16
vs 0.08-0.09 at `_blocks.8`). The sigmoid keeps pixels in range without clipping gradients.

All evaluation photos of one cut are optimised as one batch: the loss is a sum of
per-image terms and Adam is element-wise, so this is exactly the same as one run per photo,
at a fraction of the per-call overhead. The step size is constant, so the iterate after k
steps is exactly what a k-step budget returns: `snapshots` gives the benchmark every budget
from one run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from infenclave.assess.attacks._front import to_uint8, torch_normalise
from infenclave.enclave.imaging import Preprocess
from infenclave.errors import AssessmentError

# An independent review re-identified 4 of 4 photos at `_blocks.11` with a 400-step textbook
# inversion where the 100-step default of an earlier version recognised none: the budget is
# now a *cap*; the search stops earlier only on a loss plateau (PLATEAU_*), and
# bench/attacks.py checks at the recommended cut that doubling the cap does not recover more.
DEFAULT_STEPS = 400  # the cap per restart
MIN_STEPS = 100  # never stop on a "plateau" before this many steps
PLATEAU_WINDOW = 50  # steps
PLATEAU_TOLERANCE = 0.01  # stop when the mean loss fell by less than 1% over the window
# Restarts: different seeds *and* different formulations; the best reconstruction per photo by
# relative IR error (what the attacker can measure) is kept. `relative-mse` is the textbook
# loss; `channel-normalised` weights every channel equally, so the many weak channels of a deep
# cut, which the energy-weighted loss ignores, pull on the image too.
FORMULATIONS = ("relative-mse", "channel-normalised")
DEFAULT_RESTARTS = 2
CHANNEL_EPS = 1e-3  # of the mean channel energy: dead channels do not blow up the normalised loss
LEARNING_RATE = 0.05  # Adam on the pyramid logits; 0.1 ends with a higher IR error at 100 steps
TV_WEIGHT = 0.02  # 0.005 and 0.05 measured no better; larger blurs the early cuts
PYRAMID_SCALES = (1, 2, 4, 8, 16, 32)  # pyramid levels, as input-size divisors
INIT_NOISE = 0.1  # std of the random logits around mid-grey the search starts from
TV_EPS = 1e-6  # keeps the square root's gradient finite on flat regions
# Square root of the ImageNet RGB colour correlation (Olah et al., Lucid), columns = the
# decorrelated channels; scaled below so that the largest column has unit norm.
_COLOUR_SQRT = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))


@dataclass
class WhiteboxRun:
    """One cut's inversion of a batch of observed IRs."""

    reconstructions: np.ndarray  # (B, H, W, 3) uint8
    ir_error: np.ndarray  # (B,) relative squared IR error of the returned (uint8) images
    seconds: float
    steps: int
    loss_curve: list[float] = field(default_factory=list)  # mean loss per step
    snapshots: dict[int, np.ndarray] = field(default_factory=dict)  # step -> (B, H, W, 3) uint8


class PyramidImage:
    """A batch of images x = sigmoid(C @ sum_k upsample(z_k)): the variables Adam moves."""

    def __init__(self, batch: int, hw: tuple[int, int], seed: int) -> None:
        import torch

        gen = torch.Generator().manual_seed(seed)
        h, w = hw
        self.hw = hw
        self.parameters = [
            (torch.randn((batch, 3, -(-h // s), -(-w // s)), generator=gen) * INIT_NOISE).requires_grad_(True)
            for s in PYRAMID_SCALES
        ]  # (B, 3, ceil(H/s), ceil(W/s)) each
        c = torch.tensor(_COLOUR_SQRT)
        self.colour = c / c.norm(dim=0).max()  # (3 RGB, 3 decorrelated)

    def __call__(self) -> Any:
        import torch
        import torch.nn.functional as F

        z = self.parameters[0]
        for level in self.parameters[1:]:
            z = z + F.interpolate(level, size=self.hw, mode="bilinear", align_corners=False)
        rgb = torch.einsum("ij,bjhw->bihw", self.colour, z)  # (B, 3, H, W)
        return torch.sigmoid(rgb)


def total_variation(x: Any) -> Any:
    """Isotropic TV per image of (B, 3, H, W): mean gradient magnitude -> (B,)."""
    import torch

    dx = x[:, :, :-1, 1:] - x[:, :, :-1, :-1]
    dy = x[:, :, 1:, :-1] - x[:, :, :-1, :-1]
    return torch.sqrt(dx * dx + dy * dy + TV_EPS).mean(dim=(1, 2, 3))


def relative_ir_error(front: Any, x01: Any, target: Any, pre: Preprocess) -> Any:
    """||F(x) - y||^2 / ||y||^2 per image -> (B,)."""
    y = front(torch_normalise(x01, pre))
    dims = tuple(range(1, y.dim()))
    return ((y - target) ** 2).sum(dim=dims) / (target**2).sum(dim=dims).clamp_min(1e-12)


def channel_normalised_error(front: Any, x01: Any, target: Any, pre: Preprocess) -> Any:
    """Mean over channels of ||F_c(x) - y_c||^2 / ||y_c||^2 per image -> (B,)."""
    y = front(torch_normalise(x01, pre))
    if y.dim() == 2:  # a vector IR: every element is a channel
        num, den = (y - target) ** 2, target**2
    else:
        dims = tuple(range(2, y.dim()))
        num, den = ((y - target) ** 2).sum(dim=dims), (target**2).sum(dim=dims)  # (B, C)
    eps = CHANNEL_EPS * den.mean(dim=1, keepdim=True).clamp_min(1e-12)
    return (num / (den + eps)).mean(dim=1)


def plateaued(curve: Sequence[float]) -> bool:
    """True when the loss fell by less than PLATEAU_TOLERANCE over the last PLATEAU_WINDOW steps."""
    if len(curve) < max(MIN_STEPS, PLATEAU_WINDOW + 1):
        return False
    before, now = curve[-PLATEAU_WINDOW - 1], curve[-1]
    return (before - now) <= PLATEAU_TOLERANCE * abs(before)


@dataclass
class ConvergedRun:
    """The best of several restarts per photo."""

    reconstructions: np.ndarray  # (B, H, W, 3) uint8
    ir_error: np.ndarray  # (B,) relative IR error of the kept reconstruction
    chosen: list[str]  # per photo: the restart kept ("relative-mse#0", ...)
    runs: list[dict[str, Any]]  # per restart: formulation, seed, steps, plateau, final loss
    seconds: float
    steps: int  # total Adam steps over all restarts


def invert_converged(
    front: Any,
    target: np.ndarray,
    pre: Preprocess,
    *,
    max_steps: int = DEFAULT_STEPS,
    restarts: int = DEFAULT_RESTARTS,
    seed: int = 0,
    on_step: Callable[[int, int], None] | None = None,
) -> ConvergedRun:
    """`restarts` inversions (alternating formulations, fresh seeds), each to a plateau or the
    cap; per photo the reconstruction with the lowest relative IR error is kept."""
    if restarts < 1:
        raise AssessmentError("the white-box attack needs at least one restart")
    total = restarts * max_steps
    runs: list[dict[str, Any]] = []
    steps_done = 0
    for r in range(restarts):
        loss = FORMULATIONS[r % len(FORMULATIONS)]
        base = steps_done

        def tick(done: int, _total: int, _base: int = base) -> None:
            if on_step is not None:
                on_step(min(total, _base + done), total)

        run = invert(
            front,
            target,
            pre,
            steps=max_steps,
            seed=restart_seed(seed, r),
            loss=loss,
            stop_on_plateau=True,
            on_step=tick,
        )
        steps_done += run.steps
        runs.append(restart_record(run, r, restart_seed(seed, r), max_steps))
    best = best_of_restarts(runs)
    if on_step is not None:
        on_step(total, total)
    return best


def restart_seed(seed: int, restart: int) -> int:
    """The seed of restart `restart` of a white-box run seeded `seed`."""
    return seed + 1009 * restart


def restart_record(run: WhiteboxRun, restart: int, seed: int, max_steps: int) -> dict[str, Any]:
    """One restart's figures and images, as `best_of_restarts` takes them (the images under
    the private keys `_reconstructions` and `_ir_error`, left out of the plan)."""
    return {
        "formulation": FORMULATIONS[restart % len(FORMULATIONS)],
        "seed": seed,
        "steps": run.steps,
        "plateau": run.steps < max_steps,
        "final_loss": run.loss_curve[-1],
        "seconds": run.seconds,
        "_reconstructions": run.reconstructions,
        "_ir_error": run.ir_error,
    }


def best_of_restarts(records: Sequence[dict[str, Any]]) -> ConvergedRun:
    """Per photo, the restart whose reconstruction has the lowest relative IR error (restarts in
    order; a tie keeps the earlier one). The one rule for every place restarts are combined,
    whether they ran one after another here or as separate tasks (`tasks`)."""
    if not records:
        raise AssessmentError("the white-box attack ran no restart")
    best: ConvergedRun | None = None
    runs = [{k: v for k, v in r.items() if not k.startswith("_") and k != "seconds"} for r in records]
    for r, rec in enumerate(records):
        recon, err = np.asarray(rec["_reconstructions"]), np.asarray(rec["_ir_error"])
        label = f"{rec['formulation']}#{r}"
        if best is None:
            best = ConvergedRun(recon.copy(), err.copy(), [label] * len(err), runs, 0.0, 0)
            continue
        better = err < best.ir_error
        best.reconstructions[better] = recon[better]
        best.ir_error[better] = err[better]
        best.chosen = [label if b else c for b, c in zip(better, best.chosen)]
    assert best is not None
    best.seconds = float(sum(rec["seconds"] for rec in records))
    best.steps = int(sum(rec["steps"] for rec in records))
    return best


def invert(
    front: Any,
    target: np.ndarray,
    pre: Preprocess,
    *,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    lr: float = LEARNING_RATE,
    tv_weight: float = TV_WEIGHT,
    loss: str = FORMULATIONS[0],
    stop_on_plateau: bool = False,
    snapshots: Sequence[int] = (),
    on_step: Callable[[int, int], None] | None = None,
) -> WhiteboxRun:
    """Reconstruct images from observed IRs `target` ((B, *cut shape)) through `front`.

    `front` is the torch FrontNet with frozen parameters (see `_front.torch_front`). With
    `stop_on_plateau`, `steps` is a cap and `WhiteboxRun.steps` the steps actually taken.
    """
    import torch

    if steps < 1:
        raise AssessmentError("the white-box attack needs at least one step")
    if loss not in FORMULATIONS:
        raise AssessmentError(f"unknown white-box loss {loss!r}; use one of {', '.join(FORMULATIONS)}")
    ir_loss = relative_ir_error if loss == "relative-mse" else channel_normalised_error
    y = torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32))
    image = PyramidImage(len(y), pre.input_hw, seed)
    opt = torch.optim.Adam(image.parameters, lr=lr)
    want = set(snapshots)
    run = WhiteboxRun(reconstructions=np.empty(0), ir_error=np.empty(0), seconds=0.0, steps=steps)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        x = image()  # (B, 3, H, W) in (0, 1)
        value = ir_loss(front, x, y, pre) + tv_weight * total_variation(x)  # (B,)
        value.sum().backward()  # images are independent: the sum separates
        opt.step()
        run.loss_curve.append(float(value.detach().mean()))
        if step in want:
            run.snapshots[step] = to_uint8(image())
        if on_step is not None:
            on_step(step, steps)
        if stop_on_plateau and plateaued(run.loss_curve):
            run.steps = step
            break
    run.seconds = time.perf_counter() - start
    run.reconstructions = to_uint8(image())
    with torch.no_grad():  # judge the images the attacker would actually look at (uint8)
        x8 = torch.from_numpy(run.reconstructions).permute(0, 3, 1, 2).float() / 255.0
        run.ir_error = relative_ir_error(front, x8, y, pre).numpy().astype(np.float64)
    return run
