"""What the architecture implies about gradient flow: which loss reaches which layer.

A head's loss reaches every layer its output depends on: its own layers, the trunk
nodes on the way back to the inputs, and nothing else. The regularization term
reaches the kernel of every layer with a kernel regularizer (not its bias) and,
through an activity regularizer on a layer's output, that layer and all layers it
depends on. Loss weights do not change reach (a zero-weight head still *reaches*
its layers; the total just carries it with weight 0).
"""

from __future__ import annotations

from collections.abc import Callable

from gradcheck.architectures.spec import REGULARIZATION, ModelSpec
from gradcheck.architectures.weights import parameters

__all__ = ["expected_flow", "layer_ancestors"]


def layer_ancestors(spec: ModelSpec) -> dict[str, frozenset[str]]:
    """Every tensor name -> the layers it depends on, itself included (layers
    without parameters included too; inputs depend on nothing)."""
    anc: dict[str, frozenset[str]] = {i.name: frozenset() for i in spec.inputs}
    for name, _, srcs in spec.layers():
        anc[name] = frozenset({name}).union(*(anc[s] for s in srcs))
    return anc


def expected_flow(
    spec: ModelSpec, kernel: Callable[[str], str] = lambda layer: f"{layer}/kernel"
) -> dict[str, list[str]]:
    """``{layer name or kernel tensor name: the losses that should reach it}``, the
    ``expected=`` of :func:`gradcheck.check_locality`. ``kernel(layer)`` names a
    layer's kernel tensor in the framework (``"dense.weight"`` in torch); it is
    used only for kernel regularizers, which reach the kernel but not the bias."""
    anc = layer_ancestors(spec)
    reach: dict[str, set[str]] = {name: set() for name, _, _ in spec.layers()}
    for h in spec.heads:
        for layer in anc[h.name]:
            reach[layer].add(h.name)
    out: dict[str, list[str]] = {}
    kernels: list[str] = []
    for name, layer, _ in spec.layers():
        if layer.activity_regularizer is not None:
            for a in anc[name]:
                reach[a].add(REGULARIZATION)
        if layer.kernel_regularizer is not None:
            kernels.append(name)
    order = {n: i for i, n in enumerate(list(spec.head_names) + [REGULARIZATION])}
    for name, names in reach.items():
        out[name] = sorted(names, key=order.__getitem__)
    for name in kernels:
        out[kernel(name)] = sorted(
            set(out[name]) | {REGULARIZATION}, key=order.__getitem__
        )
    return out


def head_branches_below_weights(spec: ModelSpec, head: str) -> bool:
    """Whether ``head`` branches below a layer with weights. If not (only dropout,
    add or 2-D pools above it), detaching its input changes no gradient: the
    audit's planted "head input detached" has nothing to cut there."""
    weighted = {p.layer for p in parameters(spec)}
    return bool(layer_ancestors(spec)[spec.head(head).source] & weighted)
