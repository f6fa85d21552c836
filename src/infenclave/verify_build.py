"""Compile a BackNet ONNX graph into its verification file, and expose what the host must send.

Runs in `partition` on the owner's machine (never in the enclave). Steps:

1. Fix the batch axis to 1 and infer every tensor's static shape (the enclave checks one
   request at a time).
2. Fold everything that does not depend on IR1 into constants: initializers, ``Constant``
   nodes, and the shape arithmetic (``Shape`` of a tensor is known once shapes are static),
   evaluated with ONNX's reference evaluator.
3. Translate each remaining node into a verifier op (`infenclave.protocol.backnet_verify.OPS`).
   A node the verifier does not cover is refused with its type and name: `partition` then
   refuses verified mode (``--unverified-backnet`` writes unverified mode explicitly).
4. Make every checked op's output a graph output of the BackNet the host runs, after IR2, in
   the order the verifier expects them (the host sends them in that order).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from infenclave.errors import GraphError
from infenclave.protocol.backnet_verify import SENT_OPS, encode_verify_file

__all__ = ["UnsupportedOp", "build_verification", "uncovered_ops"]


class UnsupportedOp(GraphError):
    """A BackNet operator that the verifier does not cover."""


def build_verification(back: onnx.ModelProto, input_shape: tuple[int, ...]) -> tuple[bytes, onnx.ModelProto]:
    """(verification file bytes, BackNet with every checked tensor as an extra graph output).

    *input_shape* is IR1's per-image shape (without the batch axis).
    """
    model = copy.deepcopy(back)
    graph = model.graph
    (inp,) = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    (out,) = graph.output
    # Step 1: batch 1; each data node's output shape is measured by running it alone on
    # zeros (ONNX shape inference cannot see through the exported padding arithmetic).
    shapes: dict[str, tuple[int, ...]] = {inp.name: (1, *input_shape)}
    # Step 2: constants.
    consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    ids = {inp.name: 0}
    ops: list[dict[str, Any]] = []
    names: list[str] = []
    blob = bytearray()

    def weight(array: np.ndarray) -> list[Any]:
        a = np.ascontiguousarray(array, dtype="<f4")
        offset = len(blob)
        blob.extend(a.tobytes())
        return [offset, list(a.shape)]

    for node in graph.node:
        inputs = [i for i in node.input if i]
        if all(i in consts for i in inputs) or node.op_type == "Shape":
            _fold(node, consts, shapes)
            continue
        # Step 3: translate.
        shapes[node.output[0]] = _node_shape(node, shapes, consts, model)
        op = _translate(node, consts, ids, shapes, weight)
        ops.append(op)
        names.append(node.output[0])
        ids[node.output[0]] = len(ops)
    if out.name not in ids:
        raise GraphError("verified BackNet: the output does not depend on the input")
    output = ids[out.name]
    sent = [i + 1 for i, op in enumerate(ops) if op["op"] in SENT_OPS and i + 1 != output]
    header = {"input": [1, *shapes[inp.name][1:]], "ops": ops, "sent": sent, "output": output}
    # Step 4: extra outputs for the host.
    for tensor in sent:
        vi = onnx.helper.make_tensor_value_info(names[tensor - 1], onnx.TensorProto.FLOAT, None)
        graph.output.append(vi)
    return encode_verify_file(header, bytes(blob)), model


def uncovered_ops(back: onnx.ModelProto, input_shape: tuple[int, ...]) -> list[str]:
    """Empty when the verifier covers every op of *back*; else the first refusal's message."""
    try:
        build_verification(back, input_shape)
    except UnsupportedOp as exc:
        return [str(exc)]
    return []


def _node_shape(
    node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]], consts: dict[str, np.ndarray], model: onnx.ModelProto
) -> tuple[int, ...]:
    import onnxruntime as ort

    h = onnx.helper
    data = [i for i in dict.fromkeys(node.input) if i and i not in consts]
    missing = [i for i in data if i not in shapes]
    if missing:
        raise UnsupportedOp(
            f"verified BackNet: {node.op_type} ({node.name}) reads {missing[0]!r}, neither input nor constant"
        )
    graph = h.make_graph(
        [node],
        "shape",
        [h.make_tensor_value_info(i, onnx.TensorProto.FLOAT, list(shapes[i])) for i in data],
        [h.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(consts[i], i) for i in dict.fromkeys(node.input) if i and i in consts],
    )
    one = h.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    session = ort.InferenceSession(one.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run([node.output[0]], {i: np.zeros(shapes[i], np.float32) for i in data})
    return tuple(int(d) for d in y.shape)


def _fold(node: onnx.NodeProto, consts: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> None:
    if node.op_type == "Shape":
        if any(a.name in ("start", "end") for a in node.attribute):
            raise UnsupportedOp(f"verified BackNet: Shape with start/end ({node.name})")
        consts[node.output[0]] = np.array(shapes[node.input[0]], dtype=np.int64)
        return
    if node.op_type == "Constant":
        consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        return
    from onnx.reference import ReferenceEvaluator

    feeds = {i: consts[i] for i in node.input if i}
    results = ReferenceEvaluator(node).run(None, feeds)
    for name, value in zip(node.output, results):
        consts[name] = np.asarray(value)


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _translate(
    node: onnx.NodeProto,
    consts: dict[str, np.ndarray],
    ids: dict[str, int],
    shapes: dict[str, tuple[int, ...]],
    weight: Any,
) -> dict[str, Any]:
    kind = node.op_type
    where = f"{kind} ({node.name or node.output[0]})"
    out_shape = shapes.get(node.output[0])
    if not out_shape or not all(isinstance(d, int) and d > 0 for d in out_shape):
        raise UnsupportedOp(f"verified BackNet: no static shape for the output of {where}")

    def tensor(name: str) -> int:
        if name not in ids:
            raise UnsupportedOp(f"verified BackNet: {where} reads {name!r}, neither input nor constant")
        return ids[name]

    def op(
        name: str, inputs: list[int], attrs: dict[str, Any] | None = None, weights: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return {"op": name, "in": inputs, "shape": [1, *out_shape[1:]], "attrs": attrs or {}, "weights": weights or {}}

    x = node.input[0]
    if kind == "Conv":
        w = consts.get(node.input[1])
        if w is None or w.ndim != 4 or _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise UnsupportedOp(f"verified BackNet: {where} needs constant 2-D weights and explicit pads")
        weights = {"weight": weight(w)}
        if len(node.input) > 2 and node.input[2]:
            weights["bias"] = weight(consts[node.input[2]])
        return op(
            "conv",
            [tensor(x)],
            {
                "group": int(_attr(node, "group", 1)),
                "strides": list(_attr(node, "strides", [1, 1])),
                "pads": list(_attr(node, "pads", [0, 0, 0, 0])),
                "dilations": list(_attr(node, "dilations", [1, 1])),
            },
            weights,
        )
    if kind in ("Gemm", "MatMul"):
        b = consts.get(node.input[1])
        if (
            b is None
            or b.ndim != 2
            or _attr(node, "transA", 0)
            or _attr(node, "alpha", 1.0) != 1.0
            or _attr(node, "beta", 1.0) != 1.0
        ):
            raise UnsupportedOp(f"verified BackNet: {where} needs constant 2-D weights, alpha = beta = 1")
        w = b if (kind == "Gemm" and _attr(node, "transB", 0)) else b.T  # (N, K)
        weights = {"weight": weight(w)}
        if len(node.input) > 2 and node.input[2]:
            c = consts[node.input[2]]
            if c.size != w.shape[0]:
                raise UnsupportedOp(f"verified BackNet: {where} bias must be one value per output")
            weights["bias"] = weight(c.reshape(-1))
        return op("linear", [tensor(x)], weights=weights)
    if kind in ("Add", "Mul"):
        name = kind.lower()
        a, b = node.input[0], node.input[1]
        if a in consts or b in consts:
            const, var = (consts[a], b) if a in consts else (consts[b], a)
            return op(name, [tensor(var)], weights={"const": weight(const)})
        return op(name, [tensor(a), tensor(b)])
    if kind in ("Clip", "Relu"):
        lo = float(consts[node.input[1]]) if len(node.input) > 1 and node.input[1] else None
        hi = float(consts[node.input[2]]) if len(node.input) > 2 and node.input[2] else None
        if kind == "Relu":
            lo, hi = 0.0, None
        return op("clip", [tensor(x)], {"min": lo, "max": hi})
    if kind == "Sigmoid":
        return op("sigmoid", [tensor(x)])
    if kind == "Pad":
        pads = consts.get(node.input[1]) if len(node.input) > 1 else None
        value = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if (
            _attr(node, "mode", b"constant") not in (b"constant", "constant")
            or pads is None
            or pads.size != 8
            or (pads < 0).any()
            or (value is not None and float(value) != 0.0)
            or len(node.input) > 3
        ):
            raise UnsupportedOp(f"verified BackNet: {where} must be a zero pad on a 4-D tensor")
        return op("pad", [tensor(x)], {"pads": [int(p) for p in pads]})
    if kind in ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout"):
        return op("reshape", [tensor(x)])
    if kind == "GlobalAveragePool" or (kind == "ReduceMean" and _reduce_hw(node, consts)):
        return op("gap", [tensor(x)])
    if kind == "MaxPool":
        if (
            _attr(node, "ceil_mode", 0)
            or any(d != 1 for d in _attr(node, "dilations", [1, 1]))
            or len(node.output) > 1
            or _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
        ):
            raise UnsupportedOp(f"verified BackNet: {where} with ceil_mode, dilation or indices")
        return op(
            "maxpool",
            [tensor(x)],
            {
                "kernel": list(_attr(node, "kernel_shape")),
                "strides": list(_attr(node, "strides", [1, 1])),
                "pads": list(_attr(node, "pads", [0, 0, 0, 0])),
            },
        )
    if kind == "BatchNormalization":
        return op(
            "batchnorm",
            [tensor(x)],
            {"epsilon": float(_attr(node, "epsilon", 1e-5))},
            {k: weight(consts[n]) for k, n in zip(("scale", "bias", "mean", "var"), node.input[1:5])},
        )
    if kind == "Concat":
        axis = int(_attr(node, "axis"))
        return op("concat", [tensor(i) for i in node.input], {"axis": axis if axis >= 0 else axis + 4})
    raise UnsupportedOp(
        f"verified BackNet: op {where} is not covered by the verifier "
        "(partition with --unverified-backnet to serve this BackNet unverified)"
    )


def _reduce_hw(node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> bool:
    axes = _attr(node, "axes")
    if axes is None and len(node.input) > 1:
        axes = consts.get(node.input[1])
    return axes is not None and sorted(int(a) for a in np.ravel(axes)) == [2, 3] and _attr(node, "keepdims", 1) == 1
