"""A model analysed for partitioning: its canonical ONNX graph and its cut points with costs.

`analyse(model)` is the one entry point. For torch models the cut points come from `torch.fx`
and the graph is exported once to ONNX with every cut tensor named; ONNX models are analysed
on their own graph. Either way the result is one ONNX graph in which each cut point is a named
tensor, from which any ternary split is extracted without re-exporting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from infenclave.errors import GraphError, ModelError
from infenclave.graph import RawCut, find_cuts, localise_batch_reads, onnx_ops
from infenclave.models.spec import LoadedModel


@dataclass(frozen=True)
class CutPoint:
    """A place the network may be cut, with what each side costs (per image, batch 1)."""

    index: int
    name: str
    tensor: str  # tensor name in the canonical ONNX graph
    shape: tuple[int, ...]  # per image, without the batch axis
    front_param_bytes: int
    front_flops: int
    back_param_bytes: int
    back_flops: int

    @property
    def is_feature_map(self) -> bool:
        """A (C, H, W) map with spatial extent: what the KL projection method needs."""
        return len(self.shape) == 3 and self.shape[1] * self.shape[2] > 1

    @property
    def activation_bytes(self) -> int:
        return int(np.prod(self.shape)) * 4

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "tensor": self.tensor,
            "shape": list(self.shape),
            "front_param_bytes": self.front_param_bytes,
            "front_flops": self.front_flops,
            "back_param_bytes": self.back_param_bytes,
            "back_flops": self.back_flops,
        }


@dataclass
class Network:
    model: LoadedModel
    onnx_model: onnx.ModelProto  # shape-inferred, dynamic batch, one input, one output
    input_name: str
    output_name: str
    cuts: list[CutPoint]
    fx: Any = None  # torch.fx.GraphModule for torch models, None for ONNX models
    fx_cut_nodes: dict[str, str] = field(default_factory=dict)  # cut name -> fx node name
    _shape_cache: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)  # on first use

    def cut(self, name: str) -> CutPoint:
        for c in self.cuts:
            if c.name == name:
                return c
        raise GraphError(f"unknown cut point {name!r}; valid: {', '.join(c.name for c in self.cuts)}")

    def part_cost(self, start: CutPoint | None, end: CutPoint | None) -> tuple[int, int, int]:
        """(parameter bytes, FLOPs, peak activation bytes) of the part between two cuts."""
        nodes = _part_nodes(
            self.onnx_model.graph, start.tensor if start else self.input_name, end.tensor if end else self.output_name
        )
        return _cost(self.onnx_model.graph, nodes, self._shapes())

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        if not self._shape_cache:
            self._shape_cache.update(_static_shapes(self.onnx_model))
        return self._shape_cache

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._shapes()[self.input_name]

    def onnx_bytes(self) -> bytes:
        return self.onnx_model.SerializeToString()


_CACHE: dict[tuple[str, str], Network] = {}


def analyse(model: LoadedModel) -> Network:
    """Find cut points and costs; cached per model identity within the process."""
    key = (model.name, model.weights_sha256)
    if key not in _CACHE:
        _CACHE[key] = _analyse_torch(model) if model.torch_module is not None else _analyse_onnx(model)
    return _CACHE[key]


def _analyse_torch(model: LoadedModel) -> Network:
    import torch

    from infenclave import fx_graph

    gm = fx_graph.trace(model.torch_module)
    ops, graph_input, graph_output = fx_graph.fx_ops(gm)
    raw = find_cuts(ops, graph_input, graph_output)
    if not raw:
        raise GraphError(f"{model.name}: no valid cut point found")
    h, w = model.preprocess.input_hw
    example = torch.zeros((1, 3, h, w) if model.preprocess.layout == "NCHW" else (1, h, w, 3))
    cut_nodes = {c.name: c.tensor for c in raw}  # cut name -> fx node name
    proto = onnx.load_from_string(fx_graph.export_onnx(gm, cut_nodes, example))
    del proto.graph.output[1:]  # the cut tensors were outputs only to name them
    renamed = [RawCut(c.position, _tensor_name(c.name), c.name) for c in raw]
    net = _build(model, proto, renamed)
    net.fx = gm
    net.fx_cut_nodes = cut_nodes
    return net


def _tensor_name(cut_name: str) -> str:
    """ONNX tensor name of a cut point: prefixed, since units of a Sequential are named 0, 1, ..."""
    return f"cut/{cut_name}"


def _analyse_onnx(model: LoadedModel) -> Network:
    assert model.onnx_path is not None
    try:
        proto = onnx.load(str(model.onnx_path))
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ModelError(f"{model.onnx_path}: not a valid ONNX model ({exc.__class__.__name__})") from exc
    ops, graph_input, graph_output = onnx_ops(proto.graph)  # checks one input, one output
    localise_batch_reads(proto.graph)
    ops, graph_input, graph_output = onnx_ops(proto.graph)
    raw = find_cuts(ops, graph_input, graph_output)
    if not raw:
        raise GraphError(f"{model.name}: no valid cut point found in the ONNX graph")
    return _build(model, proto, raw)


def _build(model: LoadedModel, proto: onnx.ModelProto, raw: list[RawCut]) -> Network:
    proto = shape_inference.infer_shapes(proto)
    graph = proto.graph
    initializers = {t.name for t in graph.initializer}
    input_name = next(i.name for i in graph.input if i.name not in initializers)
    net = Network(model=model, onnx_model=proto, input_name=input_name, output_name=graph.output[0].name, cuts=[])
    shapes = net._shapes()
    expected = _expected_input(model)
    if input_name in shapes and shapes[input_name][1:] != expected:
        raise ModelError(
            f"{model.name}: the model takes input {list(shapes[input_name][1:])} but the "
            f"preprocessing produces {list(expected)}"
        )
    out_shape = shapes.get(net.output_name)
    if out_shape is not None and out_shape[-1] != model.num_classes:
        raise ModelError(f"{model.name}: the model has {out_shape[-1]} outputs but {model.num_classes} labels")
    total_params, total_flops, _ = _cost(graph, list(range(len(graph.node))), shapes)
    for i, rc in enumerate(raw):
        front = _part_nodes(graph, input_name, rc.tensor)
        fp, ff, _ = _cost(graph, front, shapes)
        net.cuts.append(
            CutPoint(
                index=i,
                name=rc.name,
                tensor=rc.tensor,
                shape=tuple(shapes[rc.tensor][1:]),
                front_param_bytes=fp,
                front_flops=ff,
                back_param_bytes=total_params - fp,
                back_flops=total_flops - ff,
            )
        )
    return net


def _expected_input(model: LoadedModel) -> tuple[int, ...]:
    h, w = model.preprocess.input_hw
    return (3, h, w) if model.preprocess.layout == "NCHW" else (h, w, 3)


def _static_shapes(proto: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Shapes of every activation at batch 1, by running the graph once on zeros."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    graph = probe.graph
    initializers = {t.name for t in graph.initializer}
    existing = {o.name for o in graph.output}
    names = [t for n in graph.node for t in n.output if t and t not in existing]
    for t in names:
        graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    inp = next(i for i in graph.input if i.name not in initializers)
    dims = [d.dim_value if d.dim_value > 0 else 1 for d in inp.type.tensor_type.shape.dim]
    elem = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    values = sess.run(out_names, {inp.name: np.zeros(dims, dtype=elem)})
    shapes = {inp.name: tuple(dims)}
    shapes.update({n: tuple(np.shape(v)) for n, v in zip(out_names, values)})
    return shapes


def _part_nodes(graph: onnx.GraphProto, start: str, end: str) -> list[int]:
    """Indices of the nodes that compute `end` from `start` (ancestors of end, stopping at start)."""
    producer = {t: i for i, n in enumerate(graph.node) for t in n.output}
    seen: set[int] = set()
    stack = [end]
    visited: set[str] = set()
    while stack:
        t = stack.pop()
        if t in visited or t == start or t not in producer:
            continue
        visited.add(t)
        i = producer[t]
        if i not in seen:
            seen.add(i)
            stack.extend(graph.node[i].input)
    return sorted(seen)


def _cost(graph: onnx.GraphProto, nodes: list[int], shapes: dict[str, tuple[int, ...]]) -> tuple[int, int, int]:
    init = {t.name: t for t in graph.initializer}
    used: set[str] = set()
    flops = 0
    peak = 0
    for i in nodes:
        node = graph.node[i]
        used.update(t for t in node.input if t in init)
        out = shapes.get(node.output[0]) if node.output else None
        ins = [shapes.get(t) for t in node.input if t not in init]
        if out is not None:
            io_bytes = sum(int(np.prod(s)) * 4 for s in [out, *ins] if s is not None)
            peak = max(peak, io_bytes)
            flops += _node_flops(node, out, init)
    params = sum(numpy_helper.to_array(init[t]).nbytes for t in used)
    return int(params), int(flops), int(peak)


def _node_flops(node: onnx.NodeProto, out: tuple[int, ...], init: dict[str, onnx.TensorProto]) -> int:
    n_out = int(np.prod(out)) if out else 1
    if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in init:
        w = init[node.input[1]].dims  # (Cout, Cin/groups, kh, kw)
        return 2 * n_out * int(np.prod(w[1:]))
    if node.op_type in ("Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in init:
        w = init[node.input[1]].dims
        k = w[1] if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute) else w[0]
        return 2 * n_out * int(k)
    return n_out
