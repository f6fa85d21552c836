"""The ternary split: FrontNet (input to cut f), BackNet (f to t), Tail (t to output).

Each part is a self-contained ONNX graph with one input and one output, extracted from the
canonical graph of `network.analyse`. ONNX is the bundle format because it runs without the
model's Python code and without unpickling, and ONNX Runtime is the fastest runtime measured
here (see `enclave/onnx_runner.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnx.utils

from infenclave.errors import GraphError
from infenclave.network import CutPoint, Network


@dataclass(frozen=True)
class TernarySplit:
    front_end: CutPoint
    tail_start: CutPoint
    front: onnx.ModelProto
    back: onnx.ModelProto
    tail: onnx.ModelProto

    def parts_bytes(self) -> dict[str, bytes]:
        return {
            "front": self.front.SerializeToString(),
            "back": self.back.SerializeToString(),
            "tail": self.tail.SerializeToString(),
        }


def check_pair(net: Network, front_end: str, tail_start: str) -> tuple[CutPoint, CutPoint]:
    f, t = net.cut(front_end), net.cut(tail_start)
    if f.index >= t.index:
        raise GraphError(f"the FrontNet end {f.name!r} must come before the Tail start {t.name!r}")
    return f, t


def ternary_split(
    net: Network, front_end: str, tail_start: str, *, extractor: onnx.utils.Extractor | None = None
) -> TernarySplit:
    """Cut `net` into three parts at the named cut points (pass an extractor to reuse it)."""
    f, t = check_pair(net, front_end, tail_start)
    ex = extractor or onnx.utils.Extractor(net.onnx_model)
    return TernarySplit(
        front_end=f,
        tail_start=t,
        front=_extract(ex, net.input_name, f.tensor, "frontnet"),
        back=_extract(ex, f.tensor, t.tensor, "backnet"),
        tail=_extract(ex, t.tensor, net.output_name, "tail"),
    )


def _extract(ex: onnx.utils.Extractor, start: str, end: str, name: str) -> onnx.ModelProto:
    part = ex.extract_model([start], [end])
    part.graph.name = name
    return part
