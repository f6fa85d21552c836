"""Model specs: what a `MODEL` argument names, resolved into a loaded, checked model.

A MODEL is a zoo name (`efficientnet-lite0`) or a path to a YAML spec for a user's own
classifier, given either as an ONNX file or as `package.module:function` returning an
`nn.Module`. Everything downstream (cut points, split, prediction, assessment) starts from a
`LoadedModel`.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from infenclave.enclave.imaging import Preprocess
from infenclave.errors import ModelError
from infenclave.models import zoo

SPEC_KEYS_REQUIRED = {"name", "preprocess", "labels"}
SPEC_KEYS_OPTIONAL = {"onnx", "torch", "output"}
PREPROCESS_KEYS = {"resize", "crop", "mean", "std", "channel_order", "layout"}
MAX_SPEC_BYTES = 1024 * 1024


@dataclass
class LoadedModel:
    """A model ready to analyse: exactly one of `torch_module` / `onnx_path` is set."""

    name: str
    preprocess: Preprocess
    labels: list[str]
    output: Literal["logits", "probabilities"]
    weights_sha256: str
    torch_module: Any = None  # torch.nn.Module in eval mode
    onnx_path: Path | None = None
    source: str = ""  # what the user named, for messages and the plan
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "weights_sha256": self.weights_sha256, "source": self.source}


def load_model(ref: str) -> LoadedModel:
    """Resolve a MODEL argument: zoo name or path to a spec YAML."""
    if ref in zoo.ZOO:
        entry = zoo.ZOO[ref]
        return LoadedModel(
            name=entry.name,
            preprocess=zoo.preprocess(entry),
            labels=zoo.imagenet_labels(),
            output="logits",
            weights_sha256=_sha256_file(zoo.weights_path(entry)),
            torch_module=zoo.build_module(entry),
            source=ref,
        )
    path = Path(ref)
    if path.suffix.lower() in (".yaml", ".yml") or path.exists():
        return _load_spec(path)
    raise ModelError(f"unknown model {ref!r}: use one of {', '.join(zoo.ZOO)} or a path to a model spec YAML")


def _load_spec(path: Path) -> LoadedModel:
    if not path.is_file():
        raise ModelError(f"model spec {str(path)!r} does not exist")
    raw = _read_bounded(path, MAX_SPEC_BYTES, "model spec")
    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ModelError(f"model spec {path}: not valid YAML ({exc.__class__.__name__})") from exc
    if not isinstance(doc, dict):
        raise ModelError(f"model spec {path}: expected a mapping at the top level")
    missing = SPEC_KEYS_REQUIRED - doc.keys()
    if missing:
        raise ModelError(f"model spec {path}: missing key(s): {', '.join(sorted(missing))}")
    unknown = doc.keys() - SPEC_KEYS_REQUIRED - SPEC_KEYS_OPTIONAL
    if unknown:
        raise ModelError(f"model spec {path}: unknown key(s): {', '.join(sorted(unknown))}")
    if ("onnx" in doc) == ("torch" in doc):
        raise ModelError(f"model spec {path}: give exactly one of 'onnx' or 'torch'")
    name = doc["name"]
    if not isinstance(name, str) or not name.strip():
        raise ModelError(f"model spec {path}: 'name' must be a non-empty string")
    base = path.parent
    pre = _parse_preprocess(doc["preprocess"], path)
    labels = _load_labels(base / str(doc["labels"]), path)
    output = doc.get("output", "logits")
    if output not in ("logits", "probabilities"):
        raise ModelError(f"model spec {path}: 'output' must be 'logits' or 'probabilities'")
    model = LoadedModel(name=name, preprocess=pre, labels=labels, output=output, weights_sha256="", source=str(path))
    if "onnx" in doc:
        onnx_path = base / str(doc["onnx"])
        if not onnx_path.is_file():
            raise ModelError(f"model spec {path}: ONNX file {str(onnx_path)!r} does not exist")
        model.onnx_path = onnx_path
        model.weights_sha256 = _sha256_file(onnx_path)
    else:
        model.torch_module = _import_torch_module(str(doc["torch"]), base, path)
        model.weights_sha256 = _state_dict_sha256(model.torch_module)
    return model


def _parse_preprocess(d: Any, path: Path) -> Preprocess:
    where = f"model spec {path}: preprocess"
    if not isinstance(d, dict):
        raise ModelError(f"{where} must be a mapping")
    missing = {"resize", "mean", "std"} - d.keys()
    if missing:
        raise ModelError(f"{where}: missing key(s): {', '.join(sorted(missing))}")
    unknown = d.keys() - PREPROCESS_KEYS
    if unknown:
        raise ModelError(f"{where}: unknown key(s): {', '.join(sorted(unknown))}")
    resize = d["resize"]
    if isinstance(resize, list):
        if len(resize) != 2 or not all(isinstance(v, int) and v > 0 for v in resize):
            raise ModelError(f"{where}.resize must be a positive int or [H, W]")
        resize = (resize[0], resize[1])
    elif not (isinstance(resize, int) and resize > 0):
        raise ModelError(f"{where}.resize must be a positive int or [H, W]")
    crop = d.get("crop")
    if crop is not None and not (isinstance(crop, int) and crop > 0):
        raise ModelError(f"{where}.crop must be a positive int")
    if crop is None and not isinstance(resize, tuple):
        raise ModelError(f"{where}: a short-side resize needs a crop (or give resize as [H, W])")
    for key in ("mean", "std"):
        v = d[key]
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
            raise ModelError(f"{where}.{key} must be a list of 3 numbers")
    if any(float(s) == 0 for s in d["std"]):
        raise ModelError(f"{where}.std must not contain 0")
    order = d.get("channel_order", "RGB")
    layout = d.get("layout", "NCHW")
    if order not in ("RGB", "BGR"):
        raise ModelError(f"{where}.channel_order must be RGB or BGR")
    if layout not in ("NCHW", "NHWC"):
        raise ModelError(f"{where}.layout must be NCHW or NHWC")
    mean, std = _three(d["mean"]), _three(d["std"])
    _warn_unless_pixel_units(mean, std, where)
    return Preprocess(resize=resize, crop=crop, mean=mean, std=std, channel_order=order, layout=layout)


class SpecWarning(UserWarning):
    """A model spec that loads but is probably not what its author meant."""


def _three(values: list[int | float]) -> tuple[float, float, float]:
    return float(values[0]), float(values[1]), float(values[2])


def _warn_unless_pixel_units(mean: tuple[float, float, float], std: tuple[float, float, float], where: str) -> None:
    """Warn when mean/std do not look like 0-255 pixel units (the spec's documented units).

    The usual mistake is torchvision's habit, mean [0.485, 0.456, 0.406] and std [0.229,
    0.224, 0.225] in 0-1 units: accepted silently, every input would be scaled ~255x too far
    and the model would still answer, wrongly. Mean 0 and std 1 (raw pixels) is legitimate.
    """
    raw_pixels = mean == (0.0, 0.0, 0.0) and std == (1.0, 1.0, 1.0)
    unit_range = all(0 <= m <= 1 for m in mean) and all(0 < s <= 1 for s in std)
    if unit_range and not raw_pixels:
        warnings.warn(
            f"{where}: mean {list(mean)} and std {list(std)} look like 0-1 units; "
            "infenclave reads them in 0-255 pixel units (multiply by 255, e.g. "
            "mean [123.675, 116.28, 103.53], std [58.395, 57.12, 57.375])",
            SpecWarning,
            stacklevel=2,
        )
    elif not all(0 <= m <= 255 for m in mean) or not all(0 < s <= 255 for s in std):
        warnings.warn(
            f"{where}: mean {list(mean)} or std {list(std)} fall outside 0-255 pixel units", SpecWarning, stacklevel=2
        )


def _load_labels(path: Path, spec: Path) -> list[str]:
    if not path.is_file():
        raise ModelError(f"model spec {spec}: labels file {str(path)!r} does not exist")
    text = _read_bounded(path, 16 * 1024 * 1024, "labels file").decode("utf-8", errors="strict")
    labels = [line.strip() for line in text.splitlines() if line.strip()]
    if len(labels) < 2:
        raise ModelError(f"labels file {path}: needs at least 2 class names, one per line")
    return labels


def _import_torch_module(target: str, base: Path, spec: Path) -> Any:
    if ":" not in target:
        raise ModelError(f"model spec {spec}: 'torch' must be 'package.module:function'")
    module_name, func_name = target.split(":", 1)
    sys.path.insert(0, str(base.resolve()))  # the spec's folder, so a local module.py is found
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"model spec {spec}: cannot import {module_name!r}: {exc}") from exc
    finally:
        sys.path.remove(str(base.resolve()))
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ModelError(f"model spec {spec}: {module_name} has no function {func_name!r}")
    import torch

    net = func()
    if not isinstance(net, torch.nn.Module):
        raise ModelError(f"model spec {spec}: {target} returned {type(net).__name__}, not an nn.Module")
    return net.eval()


def _state_dict_sha256(module: Any) -> str:
    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_bounded(path: Path, limit: int, what: str) -> bytes:
    from infenclave.protocol.files import read_bounded

    return read_bounded(path, limit, what, ModelError)
