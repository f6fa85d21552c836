"""Run a code-free ONNX part with ONNX Runtime, after refusing anything that is not pure data.

The enclave executes only data: a serialized ONNX graph of standard operators, never Python
code from a bundle and never a pickle. "Data" is checked, not assumed, before ONNX Runtime
sees the bytes (`check_model_is_data`): a tensor stored as *external data* makes the runtime
read a file by a path the model chooses (seen: a FrontNet whose initializer named a relative
path loaded a file from the enclave's working directory into IR1); model-local *functions*
and operators of other *domains* (contrib or custom ops) widen what runs on secrets beyond
the standard operator set. Subgraphs (If/Loop bodies) are checked the same way.

ONNX Runtime was chosen by measurement: on the 2-core development CPU it runs
EfficientNet-Lite0 at ~115 images/s against ~40 for eager torch.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

#: The standard ONNX operator set, under both of its names. The zoo models and a plain
#: ResNet-50 export need nothing else.
ALLOWED_DOMAINS = frozenset({"", "ai.onnx"})


class NotData(ValueError):
    """An ONNX model that refers to files, defines functions or uses non-standard operators."""


def check_model_is_data(model_bytes: bytes) -> None:
    """Raise `NotData` unless the model is self-contained standard-operator data."""
    model = onnx.load_model_from_string(model_bytes)
    if model.functions:
        raise NotData("the model defines ONNX functions")
    for opset in model.opset_import:
        if opset.domain not in ALLOWED_DOMAINS:
            raise NotData(f"the model imports operator domain {opset.domain!r}")
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        tensors = list(graph.initializer)
        tensors += [t for s in graph.sparse_initializer for t in (s.values, s.indices)]
        for node in graph.node:
            if node.domain not in ALLOWED_DOMAINS:
                raise NotData(f"operator {node.op_type} is from domain {node.domain!r}")
            for attr in node.attribute:
                tensors += [attr.t, *attr.tensors]
                tensors += [t for s in (attr.sparse_tensor, *attr.sparse_tensors) for t in (s.values, s.indices)]
                graphs += [attr.g, *attr.graphs]
        for tensor in tensors:
            if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
                raise NotData(f"tensor {tensor.name!r} refers to external data")


class OnnxPart:
    """One single-input, single-output ONNX graph, checked to be data, ready to run."""

    def __init__(self, model_bytes: bytes, *, threads: int = 0) -> None:
        check_model_is_data(model_bytes)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads  # 0 = ORT's default (one per core)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: ORT warnings are not for the end user
        self._session = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
        inputs = self._session.get_inputs()
        outputs = self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError("an ONNX part must have exactly one input and one output")
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self.input_shape = tuple(inputs[0].shape)  # symbolic batch dim is a str
        self.output_shape = tuple(outputs[0].shape)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        (y,) = self._session.run([self.output_name], {self.input_name: x})
        return np.asarray(y)
