"""The ternary split is exact: FrontNet -> BackNet -> Tail reproduces the whole model.

Checked for every valid (f, t) pair of every zoo model and of an ONNX model, on real photos,
with the parts serialized and run the way the bundle runs them (ONNX Runtime).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.utils
import pytest
import torch

from infenclave.enclave.imaging import prepare
from infenclave.enclave.onnx_runner import OnnxPart
from infenclave.errors import GraphError
from infenclave.fx_graph import segment
from infenclave.models import load_model
from infenclave.network import Network, analyse
from infenclave.split import ternary_split

TOLERANCE = 1e-5  # max abs difference of the logits, the bound


def _batch(net: Network, photos: dict[str, Path]) -> np.ndarray:
    pre = net.model.preprocess
    return np.concatenate([prepare(photos[n].read_bytes(), pre) for n in ("chelsea", "coffee")])


def _worst_pair_error(net: Network, x: np.ndarray) -> tuple[float, int]:
    whole = OnnxPart(net.onnx_bytes())(x)
    ex = onnx.utils.Extractor(net.onnx_model)
    names = [c.name for c in net.cuts]
    fronts: dict[str, np.ndarray] = {}
    worst, pairs = 0.0, 0
    for i, f in enumerate(names):
        for t in names[i + 1 :]:
            parts = ternary_split(net, f, t, extractor=ex).parts_bytes()
            if f not in fronts:
                fronts[f] = OnnxPart(parts["front"], threads=1)(x)
            y = OnnxPart(parts["tail"], threads=1)(OnnxPart(parts["back"], threads=1)(fronts[f]))
            worst = max(worst, float(np.abs(y - whole).max()))
            pairs += 1
    return worst, pairs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
def test_every_split_of_every_zoo_model_is_exact(name: str, photos) -> None:
    net = analyse(load_model(name))
    worst, pairs = _worst_pair_error(net, _batch(net, photos))
    n = len(net.cuts)
    assert pairs == n * (n - 1) // 2 and pairs >= 150
    assert worst <= TOLERANCE


@pytest.mark.slow
def test_every_split_of_an_onnx_model_is_exact(lite0, lite0_net, photos, tmp_path: Path) -> None:
    # The user brings an ONNX file: a plain export of Lite0 with its real weights, analysed on
    # its own graph (which reads the input's batch size at the very end: see
    # `graph.localise_batch_reads`).
    torch.onnx.export(
        lite0.torch_module,
        (torch.zeros(1, 3, 224, 224),),
        str(tmp_path / "lite0.onnx"),
        dynamo=False,
        opset_version=17,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
    )
    from infenclave.models.zoo import imagenet_labels

    (tmp_path / "labels.txt").write_text("\n".join(imagenet_labels()) + "\n")
    (tmp_path / "spec.yaml").write_text(
        "name: lite0-onnx\nonnx: lite0.onnx\nlabels: labels.txt\n"
        "preprocess: {resize: 256, crop: 224, mean: [127, 127, 127], std: [128, 128, 128]}\n"
    )
    net = analyse(load_model(str(tmp_path / "spec.yaml")))
    assert net.fx is None
    assert [c.name for c in net.cuts] == [c.name for c in lite0_net.cuts]
    worst, pairs = _worst_pair_error(net, _batch(net, photos))
    assert pairs == 171 and worst <= TOLERANCE


def test_parts_are_code_free_onnx_with_one_input_and_output(lite0_net) -> None:
    split = ternary_split(lite0_net, "_blocks.3", "_conv_head")
    for name, blob in split.parts_bytes().items():
        proto = onnx.load_from_string(blob)
        onnx.checker.check_model(proto)
        assert len(proto.graph.input) == 1 and len(proto.graph.output) == 1, name
        assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}  # standard ops only
    ir = OnnxPart(split.parts_bytes()["front"])(np.zeros((2, 3, 224, 224), np.float32))
    assert ir.shape == (2, 40, 28, 28)


def test_torch_segments_compose_exactly(lite0, lite0_net, photos) -> None:
    x = torch.from_numpy(_batch(lite0_net, photos))
    f, t = lite0_net.fx_cut_nodes["_blocks.3"], lite0_net.fx_cut_nodes["_conv_head"]
    with torch.no_grad():
        whole = lite0.torch_module(x)
        y = segment(lite0_net.fx, t, None)(segment(lite0_net.fx, f, t)(segment(lite0_net.fx, None, f)(x)))
    assert float((y - whole).abs().max()) <= TOLERANCE


def test_front_end_must_precede_tail_start(lite0_net) -> None:
    with pytest.raises(GraphError, match="must come before"):
        ternary_split(lite0_net, "_blocks.5", "_blocks.5")
