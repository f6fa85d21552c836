"""The FrontNet as each attacker gets to run it, and the victim's observed IRs.

- The victim's IR is what the host observes: the FrontNet as deployed, on ONNX Runtime.
- A chosen-inputs attacker only *queries* the FrontNet (submits photos, observes IRs): ONNX
  Runtime too, no gradients.
- A knows-weights attacker holds an exact copy: the torch segment, differentiable.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from infenclave.enclave.imaging import Preprocess, normalise
from infenclave.errors import AssessmentError
from infenclave.network import Network

IR_BATCH = 16  # images per ONNX Runtime call: large enough to amortise, small enough for RAM


class OnnxFront:
    """FrontNet from the input to one cut point on ONNX Runtime: uint8 pixels -> IR."""

    def __init__(self, net: Network, cut: str, *, threads: int = 0) -> None:
        import onnx.utils

        from infenclave.enclave.onnx_runner import OnnxPart

        point = net.cut(cut)
        part = onnx.utils.Extractor(net.onnx_model).extract_model([net.input_name], [point.tensor])
        self._part = OnnxPart(part.SerializeToString(), threads=threads)
        self._pre = net.model.preprocess
        self.shape = point.shape

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 (already at the model's input size) -> (B, *cut shape) float32."""
        return np.concatenate(
            [self._part(normalise(pixels[i : i + IR_BATCH], self._pre)) for i in range(0, len(pixels), IR_BATCH)]
        )


def torch_front(net: Network, cut: str) -> Any:
    """The exact torch FrontNet up to `cut`, parameters frozen (gradients flow to the input only)."""
    from infenclave import fx_graph

    if net.fx is None:
        raise AssessmentError(
            f"{net.model.name}: the white-box (knows-weights) attack needs the model as torch code; "
            "an ONNX-only model can be assessed with --adversary chosen-inputs, which is weaker"
        )
    # The segment shares its parameters with the caller's model: freeze a copy, so that the
    # attack never changes the model it was given (a frozen shared model once made a later
    # fine-tuning silently train nothing).
    part = copy.deepcopy(fx_graph.segment(net.fx, None, net.fx_cut_nodes[net.cut(cut).name]))
    for p in part.parameters():
        p.requires_grad_(False)
    return part


def torch_normalise(x01: Any, pre: Preprocess) -> Any:
    """(B, 3, H, W) RGB in [0, 1] -> the model's input tensor (the torch twin of `normalise`)."""
    import torch

    x = x01 * 255.0
    if pre.channel_order == "BGR":
        x = x.flip(1)
    mean = torch.tensor(pre.mean, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, dtype=x.dtype).view(1, 3, 1, 1)
    x = (x - mean) / std
    if pre.layout == "NHWC":
        x = x.permute(0, 2, 3, 1)
    return x


def to_uint8(x01: Any) -> np.ndarray:
    """(B, 3, H, W) tensor in [0, 1] -> (B, H, W, 3) uint8, rounded as an image file would be."""
    import torch

    arr = x01.detach().clamp(0, 1).mul(255).round().to(dtype=torch.uint8)
    return np.asarray(arr.permute(0, 2, 3, 1).contiguous().numpy())
