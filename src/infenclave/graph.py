"""Cut points of a network, found on its dataflow graph.

A *cut point* is a tensor T such that, in topological order, T is the only activation alive
across the boundary right after it is produced: everything after depends on the input through
T alone. On a residual network the skip tensor is alive across every node inside a block, so
cuts fall only between blocks, never inside a skip connection.

Two refinements keep the list meaningful rather than merely valid:
- *pass-through* consumers (batch norm, activations, dropout, reshapes) do not get their own
  cut: cutting before a ReLU exposes nothing that cutting after it does not, and such ops fuse
  into the producer at run time;
- where the graph carries module scopes (torch.fx module stacks, or scoped ONNX node names such
  as `/_blocks.3/_project_conv/Conv`), cuts inside one module unit (a child of the model, or an
  element of a Sequential/ModuleList child) are dropped: the unit is what the owner reasons
  about, e.g. one MBConv block.

Torch models are traced with `torch.fx`; ONNX models are read from their graph. Both feed the
same liveness sweep below.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from infenclave.errors import GraphError

if TYPE_CHECKING:
    import onnx

# ONNX op types whose output says nothing new about their (single activation) input.
ONNX_PASSTHROUGH = {
    "BatchNormalization",
    "Relu",
    "Clip",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "LeakyRelu",
    "Elu",
    "Selu",
    "Gelu",
    "Tanh",
    "Softplus",
    "PRelu",
    "Dropout",
    "Identity",
    "Flatten",
    "Reshape",
    "Squeeze",
    "Unsqueeze",
    "Shape",
    "Cast",
    "InstanceNormalization",
    "LayerNormalization",
}


@dataclass(frozen=True)
class Op:
    """One node of a dataflow graph, reduced to what the cut analysis needs."""

    name: str
    unit: str | None  # module unit (see module docstring), None when the graph has no scopes
    passthrough: bool
    inputs: tuple[str, ...]  # activation tensors only (no weights, no constants)
    outputs: tuple[str, ...]
    data_inputs: tuple[str, ...] | None = None  # `inputs` less shape-only reads; None = same

    @property
    def data(self) -> tuple[str, ...]:
        return self.inputs if self.data_inputs is None else self.data_inputs


@dataclass(frozen=True)
class RawCut:
    position: int  # index of the producing op
    tensor: str
    name: str


def find_cuts(ops: Sequence[Op], graph_input: str, graph_output: str) -> list[RawCut]:
    """The cut points of a topologically ordered op list (see module docstring)."""
    produced_at: dict[str, int] = {graph_input: -1}
    last_use: dict[str, int] = {graph_input: -1}
    consumers: dict[str, list[int]] = {}
    for i, op in enumerate(ops):
        for t in op.inputs:
            if t not in produced_at:
                raise GraphError(f"op {op.name} reads {t!r} before it is produced")
            last_use[t] = max(last_use[t], i)
            consumers.setdefault(t, []).append(i)
        for t in op.outputs:
            produced_at[t] = i
            last_use.setdefault(t, i)
    if graph_output not in produced_at:
        raise GraphError(f"graph output {graph_output!r} is never produced")
    last_use[graph_output] = len(ops)  # the output is alive to the end

    cuts: list[RawCut] = []
    used_names: dict[str, int] = {}
    for i, op in enumerate(ops[:-1]):
        live = [t for t, p in produced_at.items() if p <= i < last_use[t]]
        if len(live) != 1 or live[0] not in op.outputs or live[0] == graph_output:
            continue
        tensor = live[0]
        users = [ops[j] for j in consumers.get(tensor, [])]
        if users and all(u.passthrough for u in users):
            continue
        if op.unit is not None and users and all(u.unit == op.unit for u in users):
            continue
        name = _cut_name(ops, i, produced_at)
        used_names[name] = used_names.get(name, 0) + 1
        if used_names[name] > 1:
            name = f"{name}#{used_names[name]}"
        cuts.append(RawCut(position=i, tensor=tensor, name=name))
    return cuts


def _cut_name(ops: Sequence[Op], i: int, produced_at: dict[str, int]) -> str:
    """Name a cut after the unit that computed it, looking through pass-through ops."""
    j = i
    while ops[j].passthrough and len(ops[j].data) == 1 and produced_at[ops[j].data[0]] >= 0:
        j = produced_at[ops[j].data[0]]
    return ops[j].unit or ops[j].name


def onnx_scope_unit(node_name: str) -> str | None:
    """`/layer1/layer1.0/conv1/Conv` -> `layer1.0`; `/_blocks.3/_bn2/...` -> `_blocks.3`.

    Descends through container scopes: a component that extends its parent with `.<index>`
    is an element of a Sequential/ModuleList, and the element is the unit.
    """
    if not node_name.startswith("/"):
        return None
    parts = [p for p in node_name.split("/")[1:-1] if p]
    if not parts:
        return None
    unit = parts[0]
    for part in parts[1:]:
        if part.startswith(unit + "."):
            unit = part
        else:
            break
    return unit


def onnx_ops(graph: onnx.GraphProto) -> tuple[list[Op], str, str]:
    """Reduce an ONNX graph with one input and one output to `Op`s, dropping constant subgraphs."""
    if len(graph.input) - len({i.name for i in graph.initializer} & {i.name for i in graph.input}) != 1:
        raise GraphError("the ONNX model must have exactly one (non-initializer) input")
    if len(graph.output) != 1:
        raise GraphError(f"the ONNX model must have exactly one output, it has {len(graph.output)}")
    initializers = {t.name for t in graph.initializer}
    graph_input = next(i.name for i in graph.input if i.name not in initializers)
    activations = {graph_input}
    shape_only: set[str] = set()  # tensors that carry a shape, not data
    ops: list[Op] = []
    for k, node in enumerate(graph.node):
        inputs = tuple(t for t in node.input if t in activations)
        if not inputs:
            continue  # a constant, or computed from constants only
        outputs = tuple(t for t in node.output if t)
        activations.update(outputs)
        data = tuple(t for t in inputs if t not in shape_only)
        if node.op_type == "Shape" or not data:
            shape_only.update(outputs)
        ops.append(
            Op(
                name=node.name or f"{node.op_type}_{k}",
                unit=onnx_scope_unit(node.name),
                passthrough=node.op_type in ONNX_PASSTHROUGH and len(data) <= 1,
                inputs=inputs,
                outputs=outputs,
                data_inputs=data,
            )
        )
    return ops, graph_input, graph.output[0].name


def unique(seq: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(seq))


def localise_batch_reads(graph: onnx.GraphProto) -> int:
    """Re-point `Shape(x) -> Gather(0)` batch-size reads to a tensor next to their use.

    Exporters turn `x.view(x.size(0), -1)` into a `Shape` of the network *input* whose batch
    size is consumed at the very end, which would make every cut invalid. The batch size is the
    same everywhere in the network, so the read is moved next to the consumer and made from the
    consumer's own activation input; other dimensions (height, width) are left alone. Returns
    the number of reads moved; the node list is re-sorted topologically.
    """
    from onnx import numpy_helper

    consts: dict[str, np.ndarray | None] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute:
            consts[n.output[0]] = (
                numpy_helper.to_array(n.attribute[0].t) if n.attribute[0].t.dims or n.attribute[0].t.raw_data else None
            )
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for t in n.input:
            users.setdefault(t, []).append(n)
    shape_derived_ops = {"Gather", "Unsqueeze", "Concat", "Cast", "Squeeze"}
    moved = 0
    for shape in [n for n in graph.node if n.op_type == "Shape"]:
        gathers = users.get(shape.output[0], [])
        if len(gathers) != 1 or gathers[0].op_type != "Gather":
            continue
        idx = consts.get(gathers[0].input[1])
        if idx is None or idx.size != 1 or int(idx.reshape(-1)[0]) != 0:
            continue
        # follow the shape arithmetic to the single op that consumes it with real data
        frontier, sink, ambiguous = [gathers[0].output[0]], None, False
        while frontier:
            t = frontier.pop()
            for u in users.get(t, []):
                if u.op_type in shape_derived_ops and all(
                    i in consts or _is_shape_derived(i, graph, consts) for i in u.input
                ):
                    frontier.extend(u.output)
                elif sink is None or sink is u:
                    sink = u
                else:
                    ambiguous = True  # read by two consumers: leave it where it is
        if sink is None or ambiguous:
            continue
        data = next((i for i in sink.input if i not in consts and not _is_shape_derived(i, graph, consts)), None)
        if data is None or data == shape.input[0]:
            continue
        shape.input[0] = data
        moved += 1
    if moved:
        _toposort(graph)
    return moved


def _is_shape_derived(t: str, graph: onnx.GraphProto, consts: dict[str, np.ndarray | None]) -> bool:
    producer = {o: n for n in graph.node for o in n.output}
    seen: set[str] = set()
    stack = [t]
    while stack:
        cur = stack.pop()
        if cur in consts or cur in seen:
            continue
        seen.add(cur)
        node = producer.get(cur)
        if node is None:
            return False  # a graph input
        if node.op_type == "Shape":
            continue
        stack.extend(i for i in node.input if i)
    return True


def _toposort(graph: onnx.GraphProto) -> None:
    """Stable topological sort of the node list (original order wins among ready nodes)."""
    import heapq

    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    deps = {i: {producer[t] for t in n.input if t in producer} for i, n in enumerate(nodes)}
    dependants: dict[int, list[int]] = {}
    for i, ds in deps.items():
        for d in ds:
            dependants.setdefault(d, []).append(i)
    ready = [i for i, ds in deps.items() if not ds]
    heapq.heapify(ready)
    order: list[int] = []
    remaining = {i: len(ds) for i, ds in deps.items()}
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in dependants.get(i, []):
            remaining[j] -= 1
            if remaining[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        raise GraphError("the ONNX graph has a cycle")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
