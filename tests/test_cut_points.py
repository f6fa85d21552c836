"""Cut points on branching networks: residual, dense-connected, torch (fx) and ONNX graphs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_cli

sys.path.insert(0, str(Path(__file__).parent / "assets"))
import tiny_resnet

from infenclave.errors import GraphError
from infenclave.models import load_model
from infenclave.network import analyse

SPEC = """\
name: {name}
{source}
preprocess:
  resize: [64, 64]
  mean: [123.675, 116.28, 103.53]
  std: [58.395, 57.12, 57.375]
labels: labels.txt
"""


def write_spec(tmp: Path, name: str, source: str) -> Path:
    (tmp / "labels.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n")
    spec = tmp / f"{name}.yaml"
    spec.write_text(SPEC.format(name=name, source=source))
    return spec


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("tiny")
    (tmp / "tiny_resnet.py").write_text((Path(tiny_resnet.__file__)).read_text())
    write_spec(tmp, "tiny-torch", "torch: tiny_resnet:build")
    torch.onnx.export(
        tiny_resnet.build(),
        (torch.zeros(1, 3, 64, 64),),
        str(tmp / "tiny.onnx"),
        dynamo=False,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "b"}, "logits": {0: "b"}},
        opset_version=17,
    )
    write_spec(tmp, "tiny-onnx", "onnx: tiny.onnx")
    return tmp


def test_residual_and_dense_torch_model_cuts_only_between_blocks(tiny_dir: Path) -> None:
    net = analyse(load_model(str(tiny_dir / "tiny-torch.yaml")))
    assert [c.name for c in net.cuts] == tiny_resnet.EXPECTED_CUTS
    shapes = {c.name: c.shape for c in net.cuts}
    assert shapes["layer1.1"] == (8, 32, 32)
    assert shapes["dense"] == (32, 16, 16)  # 16 + 8 + 8 channels concatenated
    assert shapes["pool"] == (32,)
    # costs are cumulative: what is before grows, what is after shrinks
    fronts = [c.front_flops for c in net.cuts]
    assert fronts == sorted(fronts) and net.cuts[0].front_param_bytes > 0


def test_onnx_export_of_the_same_model_has_the_same_cut_points(tiny_dir: Path) -> None:
    net = analyse(load_model(str(tiny_dir / "tiny-onnx.yaml")))
    assert [c.name for c in net.cuts] == tiny_resnet.EXPECTED_CUTS
    torch_net = analyse(load_model(str(tiny_dir / "tiny-torch.yaml")))
    assert [c.shape for c in net.cuts] == [c.shape for c in torch_net.cuts]


def test_lite0_cuts_are_block_boundaries(lite0_net) -> None:
    names = [c.name for c in lite0_net.cuts]
    assert names == ["_conv_stem", *[f"_blocks.{i}" for i in range(16)], "_conv_head", "_avg_pooling"]
    assert lite0_net.cut("_blocks.3").shape == (40, 28, 28)
    last = lite0_net.cuts[-1]
    assert last.front_param_bytes + last.back_param_bytes == pytest.approx(4.65e6 * 4, rel=0.05)


def test_unknown_cut_point_is_a_clear_error(lite0_net) -> None:
    with pytest.raises(GraphError, match="unknown cut point"):
        lite0_net.cut("_blocks.99")


def test_inspect_json_cli(tiny_dir: Path) -> None:
    res = run_cli("inspect", str(tiny_dir / "tiny-torch.yaml"), "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert [c["name"] for c in doc["cut_points"]] == tiny_resnet.EXPECTED_CUTS
    assert doc["input_shape"] == [3, 64, 64]


def test_onnx_model_with_two_inputs_is_refused(tmp_path: Path) -> None:
    class TwoInputs(torch.nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.flatten(a + b, 1)[:, :10]

    torch.onnx.export(
        TwoInputs(),
        (torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 64)),
        str(tmp_path / "two.onnx"),
        dynamo=False,
        opset_version=17,
    )
    spec = write_spec(tmp_path, "two", "onnx: two.onnx")
    res = run_cli("inspect", str(spec))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["error: the ONNX model must have exactly one (non-initializer) input"]
