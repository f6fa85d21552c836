"""Every user mistake gives one clear line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from infenclave.enclave.imaging import decode_image
from infenclave.errors import ImageError


def _one_clear_line(res, needle: str) -> None:
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    assert needle in lines[0], lines[0]


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG") if mode else Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, photos) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    jpeg = photos["rocket"].read_bytes()
    files = {
        "text": b"this is not an image\n",
        "truncated": jpeg[: len(jpeg) // 2],
        "empty": b"",
        "tiny": _png(np.zeros((4, 4, 3), np.uint8)),
    }
    # A decompression bomb: a 30000x30000 PNG compresses to a few hundred KB.
    bomb = io.BytesIO()
    Image.new("1", (30000, 30000)).save(bomb, format="PNG")
    files["bomb"] = bomb.getvalue()
    out = {}
    for name, data in files.items():
        (d / f"{name}.img").write_bytes(data)
        out[name] = d / f"{name}.img"
    (d / "spec_missing.yaml").write_text("name: x\nonnx: m.onnx\n")
    (d / "spec_wrongkey.yaml").write_text(
        "name: x\nonnx: m.onnx\nlabels: l.txt\nprepro: {}\n"
        "preprocess: {resize: 1, crop: 1, mean: [0,0,0], std: [1,1,1]}\n"
    )
    (d / "spec_badyaml.yaml").write_text("name: [unclosed\n")
    out.update({k: d / f"{k}.yaml" for k in ("spec_missing", "spec_wrongkey", "spec_badyaml")})
    return out


@pytest.mark.parametrize(
    "name,needle",
    [
        ("text", "not a recognised image"),
        ("truncated", "truncated"),
        ("empty", "empty"),
        ("tiny", "at least"),
        ("bomb", "limit"),
    ],
)
def test_bad_images_are_refused_clearly(bad_files, name: str, needle: str) -> None:
    _one_clear_line(run_cli("predict", "efficientnet-lite0", str(bad_files[name])), needle)


def test_missing_image_and_unknown_model(tmp_path: Path, photos) -> None:
    _one_clear_line(run_cli("predict", "efficientnet-lite0", str(tmp_path / "nope.jpg")), "cannot read")
    _one_clear_line(run_cli("predict", "resnet-9000", str(photos["coffee"])), "unknown model")
    _one_clear_line(run_cli("inspect", str(tmp_path / "nope.yaml")), "does not exist")


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("spec_missing", "missing key(s): labels, preprocess"),
        ("spec_wrongkey", "unknown key(s): prepro"),
        ("spec_badyaml", "not valid YAML"),
    ],
)
def test_bad_specs(bad_files, spec: str, needle: str) -> None:
    _one_clear_line(run_cli("inspect", str(bad_files[spec])), needle)


def test_odd_modes_are_converted_not_refused() -> None:
    gray = _png(np.full((32, 48), 200, np.uint8))
    rgba = _png(np.dstack([np.zeros((32, 48, 3), np.uint8), np.zeros((32, 48), np.uint8)]))
    deep = io.BytesIO()
    Image.fromarray(np.full((32, 48), 65535, np.uint16)).save(deep, format="PNG")  # 16-bit gray
    assert decode_image(gray)[0, 0].tolist() == [200, 200, 200]
    assert decode_image(rgba)[0, 0].tolist() == [255, 255, 255]  # transparent -> white
    assert decode_image(deep.getvalue())[0, 0].tolist() == [255, 255, 255]  # scaled, not clipped
    assert decode_image(gray).shape == (32, 48, 3)


def test_image_of_the_wrong_shape_is_refused() -> None:
    sliver = _png(np.zeros((10, 1000, 3), np.uint8))
    with pytest.raises(ImageError, match="aspect ratio"):
        decode_image(sliver)


def test_wrong_input_size_in_a_spec_is_refused(tmp_path: Path) -> None:
    # a spec whose preprocessing produces 224x224 for a model that takes 64x64
    sys.path.insert(0, str(Path(__file__).parent / "assets"))
    (tmp_path / "tiny_resnet.py").write_text((Path(__file__).parent / "assets" / "tiny_resnet.py").read_text())
    import tiny_resnet
    import torch

    torch.onnx.export(
        tiny_resnet.build(), (torch.zeros(1, 3, 64, 64),), str(tmp_path / "t.onnx"), dynamo=False, opset_version=17
    )
    (tmp_path / "labels.txt").write_text("\n".join(f"c{i}" for i in range(10)))
    (tmp_path / "s.yaml").write_text(
        "name: t\nonnx: t.onnx\nlabels: labels.txt\npreprocess: {resize: 256, crop: 224, mean: [0,0,0], std: [1,1,1]}\n"
    )
    _one_clear_line(run_cli("inspect", str(tmp_path / "s.yaml")), "takes input [3, 64, 64]")


@pytest.mark.parametrize(
    ("mean", "std", "warned"),
    [
        ("[0.485, 0.456, 0.406]", "[0.229, 0.224, 0.225]", "look like 0-1 units"),
        ("[123.675, 116.28, 103.53]", "[58.395, 57.12, 57.375]", None),
        ("[0, 0, 0]", "[1, 1, 1]", None),
        ("[-1, 0, 0]", "[300, 1, 1]", "outside 0-255"),
    ],
)
def test_spec_mean_std_in_other_units_warn(tmp_path: Path, mean: str, std: str, warned: str | None) -> None:
    import warnings

    from infenclave.models.spec import SpecWarning, _parse_preprocess

    doc = {"resize": 256, "crop": 224, "mean": json.loads(mean), "std": json.loads(std)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _parse_preprocess(doc, tmp_path / "s.yaml")
    messages = [str(w.message) for w in caught if issubclass(w.category, SpecWarning)]
    assert (messages == []) if warned is None else (len(messages) == 1 and warned in messages[0])
