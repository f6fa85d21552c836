"""Torch models as `torch.fx` graphs: tracing, normalisation, cut analysis, export, segments.

The fx graph is where a torch model's cut points are found (module scopes come from the
tracer's module stack) and where its exact torch segments come from (the white-box attacks
need gradients through the FrontNet). The enclave never sees any of this: each part is
exported to ONNX, which runs without the model's Python code.
"""

from __future__ import annotations

import io
import operator
import warnings
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from infenclave.errors import GraphError
from infenclave.graph import Op

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_PASSTHROUGH_MODULES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.SiLU,
    nn.Sigmoid,
    nn.GELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Tanh,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.InstanceNorm2d,
)
_PASSTHROUGH_FUNCTIONS = {
    torch.relu,
    torch.nn.functional.relu,
    torch.nn.functional.relu6,
    torch.nn.functional.hardtanh,
    torch.sigmoid,
    torch.nn.functional.silu,
    torch.nn.functional.gelu,
    torch.flatten,
    torch.nn.functional.dropout,
    torch.clamp,
    torch.tanh,
    torch.reshape,
    torch.squeeze,
    torch.unsqueeze,
    torch.nn.functional.hardswish,
    torch.nn.functional.batch_norm,
}
_PASSTHROUGH_METHODS = {
    "view",
    "reshape",
    "flatten",
    "relu",
    "sigmoid",
    "clamp",
    "squeeze",
    "unsqueeze",
    "contiguous",
    "clone",
    "tanh",
    "size",
}


def trace(module: nn.Module) -> fx.GraphModule:
    """Symbolically trace in eval mode and make batch-size reads local (see `_localise_batch_reads`)."""
    module.eval()
    try:
        gm = fx.symbolic_trace(module)
    except Exception as exc:  # fx raises many types for untraceable Python control flow
        raise GraphError(f"torch.fx cannot trace this model: {exc}") from exc
    _localise_batch_reads(gm)
    return gm


def _localise_batch_reads(gm: fx.GraphModule) -> None:
    """Re-point `x.size(0)` / `x.shape[0]` to a tensor next to where the value is used.

    `flatten` written as `x.view(inputs.size(0), -1)` reads the *input's* batch size at the
    end of the network, which would make every cut invalid. The batch size is the same at
    every point of the network, so reading it from the consumer's own tensor is equivalent.
    """
    graph = gm.graph
    for node in list(graph.nodes):
        is_size0 = (
            node.op == "call_method"
            and node.target == "size"
            and (node.args[1:] == (0,) or node.kwargs.get("dim") == 0)
        )
        is_shape0 = (
            node.op == "call_function"
            and node.target is operator.getitem
            and node.args[1] == 0
            and isinstance(node.args[0], fx.Node)
            and node.args[0].op == "call_function"
            and node.args[0].target is getattr
            and node.args[0].args[1] == "shape"
        )
        if not (is_size0 or is_shape0):
            continue
        for user in list(node.users):
            local = next(
                (a for a in user.args if isinstance(a, fx.Node) and a is not node and a.op not in ("get_attr",)), None
            )
            if local is None:
                continue
            with graph.inserting_before(user):
                fresh = graph.call_method("size", (local, 0))
            fresh.meta = dict(user.meta)
            user.replace_input_with(node, fresh)
    graph.eliminate_dead_code()
    gm.recompile()


def _unit(node: fx.Node) -> str | None:
    """The outermost non-container module on the node's module stack (see `graph`)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    for key, (_path, module_type) in stack.items():
        # the traced GraphModule keeps containers only as plain Modules: use the recorded type
        if not (isinstance(module_type, type) and issubclass(module_type, _CONTAINERS)):
            return str(key)
    return None


def _is_passthrough(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_module":
        return isinstance(root.get_submodule(str(node.target)), _PASSTHROUGH_MODULES)
    if node.op == "call_function":
        return node.target in _PASSTHROUGH_FUNCTIONS
    if node.op == "call_method":
        return node.target in _PASSTHROUGH_METHODS
    return False


def _is_size(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target == "size"


def activation_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value depends on the input (everything else is a weight or a constant)."""
    act: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            act.add(node)
        elif node.op != "output" and any(a in act for a in node.all_input_nodes):
            act.add(node)
    return act


def fx_ops(gm: fx.GraphModule) -> tuple[list[Op], str, str]:
    """Reduce the traced graph to `Op`s for `graph.find_cuts`."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise GraphError(f"the model's forward must take one tensor, it takes {len(placeholders)}")
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    result = out_node.args[0]
    if not isinstance(result, fx.Node):
        raise GraphError("the model must return one tensor (logits), not a tuple or dict")
    act = activation_nodes(gm)
    ops: list[Op] = []
    for node in gm.graph.nodes:
        if node not in act or node.op == "placeholder" or _is_size(node):
            continue
        # `size(0)` reads are local after tracing (see `_localise_batch_reads`): the tensor
        # they read is an input of the same consumer, so they add nothing to liveness
        inputs = tuple(a.name for a in node.all_input_nodes if a in act and not _is_size(a))
        ops.append(
            Op(
                name=node.name,
                unit=_unit(node),
                passthrough=_is_passthrough(node, gm),
                inputs=inputs,
                outputs=(node.name,),
            )
        )
    return ops, placeholders[0].name, result.name


def export_onnx(gm: fx.GraphModule, cut_nodes: dict[str, str], example: torch.Tensor) -> bytes:
    """Export to ONNX with every cut tensor named after its cut point (then made internal again).

    Cut tensors are declared as extra graph outputs during export, which is the one reliable
    way to give them known names in the ONNX graph; `network` removes the extra outputs.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            by_name = {n.name: n for n in gm.graph.nodes}
            extra = tuple(env[by_name[n]] for n in cut_nodes.values())
            graph.output((env[node.args[0]], *extra))
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    wrapper = fx.GraphModule(gm, graph)
    names = ["input", "logits", *(f"cut/{n}" for n in cut_nodes)]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(  # the TorchScript exporter writes to a file object; its stub says path
            wrapper,
            (example,),
            buf,  # type: ignore[arg-type]
            dynamo=False,
            opset_version=17,
            do_constant_folding=True,
            input_names=names[:1],
            output_names=names[1:],
            dynamic_axes={n: {0: "batch"} for n in names},
        )
    return buf.getvalue()


def segment(gm: fx.GraphModule, start: str | None, end: str | None) -> fx.GraphModule:
    """The exact torch sub-network from node `start` (exclusive; None = input) to `end`
    (inclusive; None = output), as its own GraphModule taking one tensor."""
    nodes = list(gm.graph.nodes)
    by_name = {n.name: n for n in nodes}
    placeholder = next(n for n in nodes if n.op == "placeholder")
    out_node = next(n for n in nodes if n.op == "output")
    first = by_name[start] if start else placeholder
    last = by_name[end] if end else out_node.args[0]
    order = {n: i for i, n in enumerate(nodes)}
    act = activation_nodes(gm)

    graph = fx.Graph()
    env: dict[fx.Node, Any] = {first: graph.placeholder("x")}

    def copy(n: fx.Node) -> fx.Node:
        if n not in env:
            if n in act and order[n] <= order[first]:
                raise GraphError(f"segment after {start!r} needs {n.name}: not a valid cut")
            for a in n.all_input_nodes:
                copy(a)
            env[n] = graph.node_copy(n, lambda m: env[m])
        return env[n]

    for n in nodes[order[first] + 1 : order[last] + 1]:
        if n in act:
            copy(n)
    graph.output(env[last])
    part = fx.GraphModule(gm, graph)
    part.eval()
    return part
