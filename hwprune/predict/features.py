"""Per-node features of an ONNX graph, from shape inference: what a latency regressor sees of each node.

Each node gets a regressor key that groups nodes whose kernels cost alike (a depthwise 3x3 conv and a dense 3x3 conv
run different kernels, and channel counts off the SIMD multiple run different code paths than aligned ones), a
hierarchy of coarser keys to fall back on when a fine key has too few samples, and a short basis vector the
regressor is linear in (MACs, MACs with channels padded to the multiple, bytes moved, a constant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hwprune.backends.estimate import node_bytes, node_macs
from hwprune.backends.memory import TensorInfo, tensor_infos

# Elementwise ops ONNX Runtime folds into the kernel that produces their input (Conv/Gemm/MatMul, or an
# elementwise op already folded). A Relu after a Conv costs nothing of its own once fused.
FUSABLE_OPS = frozenset({"Relu", "Clip", "Sigmoid", "HardSigmoid", "LeakyRelu", "Tanh", "Add", "Sum", "HardSwish"})
_FUSING_PRODUCERS = frozenset({"Conv", "Gemm", "MatMul"})
SKIP_SUFFIX = "/skip"  # key of a LayerNormalization that runs fused with the residual Add before it
# ONNX Runtime's transformer fusions replace a pattern of exported nodes with one kernel named after none of them;
# the kernel's op type -> the key of the exported node that owns it (hwprune.predict.calibrate charges the kernel
# there, and the pattern's other nodes are keyed as folded). A post-norm encoder's Add -> LayerNormalization runs as
# one SkipLayerNormalization at about twice a LayerNormalization's time; unattributed, it left post-norm encoders
# predicted 11% under and pre-norm ones 8% over (the whole-model fit spread the missing time over every encoder).
FUSED_KERNEL_OWNERS = {"SkipLayerNormalization": "LayerNormalization" + SKIP_SUFFIX,
                       "SkipSimplifiedLayerNormalization": "LayerNormalization" + SKIP_SUFFIX,
                       "Gelu": "Erf", "BiasGelu": "Erf"}
# Ops that only relabel memory (no kernel time of note); kept as features, their regressors fit ~0 when so.
SKIP_OPS = frozenset({"Constant", "Identity"})
# binary elementwise ops keyed by how their operands broadcast (:func:`_broadcast_kind`)
BROADCAST_OPS = frozenset({"Mul", "Add", "Sub", "Div"})
# Basis: [1, MMACs, padded MMACs, MB moved]; scaled to millions so least squares is well conditioned.
BASIS_NAMES = ("const", "mmacs", "mmacs_padded", "mbytes")
# Input of the tree regressors (hwprune.predict.model): the kernel's geometry, in logs where it spans decades.
TREE_NAMES = ("log_macs", "log_padded", "log_bytes", "log_spatial", "log_cin", "log_cout", "kernel", "stride",
              "log_groups", "depthwise", "cin_aligned", "cout_aligned", "fused", "log_intensity", "cin_pow2",
              "cout_pow2", "activation_operand")
MAX_POW2 = 5  # channel counts divisible by 32 and more run the same blocked kernels


@dataclass(frozen=True)
class NodeFeatures:
    """What the predictor knows of one ONNX node.

    ``keys`` runs from the finest regressor key to the coarsest (the op type); ``basis`` is the regressor input.
    """

    name: str
    op_type: str
    keys: tuple[str, ...]
    macs: int
    bytes_moved: int
    cin: int
    cout: int
    spatial: int
    kernel: int
    stride: int
    groups: int
    aligned: bool
    fused: bool
    basis: tuple[float, ...]
    log_basis: tuple[float, ...] = ()  # [1, log MACs, log padded MACs, log spatial, log cin, log cout, log bytes]
    x: tuple[float, ...] = ()  # the tree regressors' input (TREE_NAMES)


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _pow2(n: int) -> float:
    """How many times 2 divides ``n`` (capped): SIMD blocking cares about 4/8/16-lane alignment, not one multiple."""
    k = 0
    while n > 0 and n % 2 == 0 and k < MAX_POW2:
        n //= 2
        k += 1
    return float(k)


def const_tensors(graph: Any) -> set[str]:
    """Tensors computable from initializers and constants alone: ORT folds the nodes producing them at load time,
    so they cost nothing per run (shape arithmetic in an exported transformer, for one)."""
    known = {t.name for t in graph.initializer}
    for n in graph.node:  # graph order is topological
        if n.op_type == "Shape" or all((not i) or i in known for i in n.input):  # shapes are static here
            known.update(o for o in n.output if o)
    return known


def _pad(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple) if multiple > 1 else n


def _shape(infos: dict[str, TensorInfo], name: str) -> tuple[int, ...]:
    info = infos.get(name) if name else None
    return info.shape if info is not None else ()


def _conv_geometry(node: Any, infos: dict[str, TensorInfo]) -> tuple[int, int, int, int, int, int]:
    """(cin, cout, out spatial size, kernel, stride, groups) of a Conv; zeros where shapes are unknown."""
    w = _shape(infos, node.input[1] if len(node.input) > 1 else "")
    out = _shape(infos, node.output[0])
    groups = int(_attr(node, "group", 1))
    cout = w[0] if w else 0
    cin = w[1] * groups if len(w) > 1 else 0
    kernel = max(w[2:]) if len(w) > 2 else 1
    strides = _attr(node, "strides", [1]) or [1]
    spatial = math.prod(out[2:]) if len(out) > 2 else 1
    return cin, cout, spatial, kernel, int(max(strides)), groups


def _matmul_geometry(node: Any, infos: dict[str, TensorInfo]) -> tuple[int, int, int]:
    """(k, n, rows) of a MatMul/Gemm: inner dim, output columns and the product of the other output dims."""
    a = _shape(infos, node.input[0])
    out = _shape(infos, node.output[0])
    k = a[-1] if a else 0
    if node.op_type == "Gemm" and _attr(node, "transA", 0) and len(a) == 2:
        k = a[0]
    n = out[-1] if out else 0
    rows = math.prod(out[:-1]) if len(out) > 1 else 1
    return k, n, rows


def _broadcast_kind(a: tuple[int, ...], b: tuple[int, ...]) -> str:
    """How a binary elementwise node's inputs meet: ``same`` shapes, a ``scalar`` operand, or a ``bcast`` (a
    squeeze-excite gate [N, C, 1, 1] over a [N, C, H, W] map runs a broadcasting kernel, and a layout reorder in and
    out of ORT's blocked format; same-shape ones are mostly folded into activations)."""
    if a == b:
        return "same"
    if math.prod(a or (1,)) == 1 or math.prod(b or (1,)) == 1:
        return "scalar"
    return "bcast"


def _conv_keys(cin: int, cout: int, kernel: int, stride: int, groups: int, aligned: bool) -> tuple[str, ...]:
    if groups > 1 and groups == cin:
        kind = f"dw{kernel}"
    elif groups > 1:
        kind = "grouped"
    else:
        kind = "1x1" if kernel == 1 else f"k{kernel}"
    fine = f"Conv/{kind}/s{stride}/{'a' if aligned else 'u'}"
    return fine, f"Conv/{kind}/{'a' if aligned else 'u'}", f"Conv/{kind}", "Conv"


def _graph_links(graph: Any) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """(tensor -> the node producing it, tensor -> the nodes reading it) of a graph."""
    producer: dict[str, Any] = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producer, consumers


def _single_consumer(consumers: dict[str, list[Any]], tensor: str) -> Any | None:
    users = consumers.get(tensor, [])
    return users[0] if len(users) == 1 else None


def _fused_nodes(graph: Any, infos: Any) -> set[str]:
    """Names of elementwise nodes ONNX Runtime can fold into the kernel producing their first input.

    A MatMul on a 3-D input (``infos``: tensor shapes and the initializer names) folds only its bias ``Add``:
    MatMulAddFusion makes a Gemm between two reshapes, and the ops after the output reshape run as kernels of their
    own (a pre-norm encoder's residual Add and ReLU, profiled at 3 us each, had been predicted folded at ~0)."""
    producer, consumers = _graph_links(graph)
    fused: dict[str, Any] = {}  # folded node -> the kernel node it is folded into
    for n in graph.node:  # topological order: a chain Conv -> Add -> Relu folds link by link
        if n.op_type not in FUSABLE_OPS or not n.input:
            continue
        for i in n.input:
            p = producer.get(i)
            if p is None or _single_consumer(consumers, i) is not n \
                    or not (p.op_type in _FUSING_PRODUCERS or p.name in fused):
                continue
            root = fused.get(p.name, p)
            if root.op_type == "MatMul" and len(_shape(infos, root.output[0])) > 2:
                bias = p is root and n.op_type == "Add" and any(j in infos.initializers for j in n.input if j != i)
                if not bias:
                    continue
            fused[n.name] = root
            break
    return set(fused)


def transformer_fusions(graph: Any) -> tuple[set[str], set[str]]:
    """The nodes ONNX Runtime's transformer fusions absorb (:data:`FUSED_KERNEL_OWNERS`).

    Returns:
        (LayerNormalization nodes fused with the Add before them into a SkipLayerNormalization, the pattern nodes
        folded into another node's kernel: those Adds, and the Div/Add/Mul around an exported GELU's Erf).
    """
    producer, consumers = _graph_links(graph)
    skip_ln: set[str] = set()
    folded: set[str] = set()
    for n in graph.node:
        if n.op_type == "LayerNormalization" and n.input:
            add = producer.get(n.input[0])
            # the Add's sum must feed the norm alone: a pre-norm block reuses it as the next residual, and ORT
            # leaves that pair unfused
            if add is not None and add.op_type == "Add" and _single_consumer(consumers, add.output[0]) is n:
                skip_ln.add(n.name)
                folded.add(add.name)
        elif n.op_type == "Erf" and n.input:
            div = producer.get(n.input[0])
            if div is not None and div.op_type == "Div":
                folded.add(div.name)
            node = n
            for _ in range(3):  # Erf -> Add(1) -> Mul(x) -> Mul(0.5), in either Mul order
                node = _single_consumer(consumers, node.output[0]) if node.output else None
                if node is None or node.op_type not in ("Add", "Mul"):
                    break
                folded.add(node.name)
    return skip_ln, folded


def node_features(node: Any, infos: dict[str, TensorInfo], channel_multiple: int, fused: bool,
                  skip_norm: bool = False) -> NodeFeatures:
    """Features of one node (see :class:`NodeFeatures`); ``channel_multiple`` decides alignment and padding."""
    op = node.op_type
    macs = node_macs(node, infos)
    moved = node_bytes(node, infos)
    cin = cout = spatial = kernel = stride = groups = 1
    padded = macs
    aligned = True
    if op == "Conv":
        cin, cout, spatial, kernel, stride, groups = _conv_geometry(node, infos)
        aligned = cin % channel_multiple == 0 and cout % channel_multiple == 0 if channel_multiple > 1 else True
        if cin and cout:
            per_group_in = _pad(cin, channel_multiple) // groups if groups == 1 else max(cin // groups, 1)
            padded = spatial * _pad(cout, channel_multiple) * per_group_in * kernel * kernel
        keys = _conv_keys(cin, cout, kernel, stride, groups, aligned)
    elif op in ("MatMul", "Gemm"):
        k, n, rows = _matmul_geometry(node, infos)
        cin, cout, spatial = k, n, rows
        aligned = (k % channel_multiple == 0 and n % channel_multiple == 0) if channel_multiple > 1 else True
        padded = rows * _pad(k, channel_multiple) * _pad(n, channel_multiple)
        weights = len(node.input) > 1 and node.input[1] in _initializer_names(infos)
        keys = (f"{op}/{'w' if weights else 'act'}/{'a' if aligned else 'u'}", f"{op}/{'w' if weights else 'act'}", op)
    else:
        out = _shape(infos, node.output[0]) if node.output else ()
        cout = out[1] if len(out) > 1 else 1
        spatial = math.prod(out[2:]) if len(out) > 2 else 1
        keys = (f"{op}@fused", op) if fused else (op,)
        if skip_norm:
            keys = (op + SKIP_SUFFIX, op)
        if not fused and op in BROADCAST_OPS and len(node.input) == 2:
            keys = (f"{op}/{_broadcast_kind(_shape(infos, node.input[0]), _shape(infos, node.input[1]))}", op)
    if op not in ("Conv", "MatMul", "Gemm") and getattr(infos, "const", None) and node.output \
            and all((not o) or o in infos.const for o in node.output):
        keys = (f"{op}@const", op)  # hwprune.predict.model.CONST_SUFFIX: predicted 0
    basis = (1.0, macs / 1e6, padded / 1e6, moved / 1e6)
    # kernel efficiency is not linear in size (small maps and thin layers waste SIMD lanes): a power law in the
    # geometry fits compute kernels far better than a line through MACs
    log_basis = (1.0, *(math.log1p(v) for v in (macs, padded, spatial, cin, cout, moved)))
    m = max(channel_multiple, 1)
    x = (math.log1p(macs), math.log1p(padded), math.log1p(moved), math.log1p(spatial), math.log1p(cin),
         math.log1p(cout), float(kernel), float(stride), math.log1p(groups), float(groups > 1 and groups == cin),
         float(cin % m == 0), float(cout % m == 0), float(fused), math.log1p(macs / max(moved, 1)), _pow2(cin),
         _pow2(cout), float(op in ("MatMul", "Gemm") and not (len(node.input) > 1
                                                              and node.input[1] in _initializer_names(infos))))
    return NodeFeatures(node.name, op, keys, macs, moved, cin, cout, spatial, kernel, stride, groups, aligned,
                        fused, basis, log_basis, x)


def _initializer_names(infos: dict[str, TensorInfo]) -> set[str]:
    # set by graph_features: the names of the graph's weights (a MatMul by a weight is a Linear layer)
    return getattr(infos, "initializers", set())


class _Infos(dict):
    """Tensor infos plus the set of initializer names (so MatMul keys can tell weights from activations)."""

    initializers: set[str]
    const: set[str]


def graph_features(onnx_path_or_model: Any, channel_multiple: int = 1) -> list[NodeFeatures]:
    """Features of every node of a graph that runs a kernel (Constant and Identity nodes left out).

    Args:
        onnx_path_or_model: an ONNX file path or ``onnx.ModelProto``.
        channel_multiple: the profile's channel multiple (alignment and padded MACs are judged against it).

    Returns:
        One :class:`NodeFeatures` per node, in graph order.
    """
    model, raw = tensor_infos(onnx_path_or_model)
    infos = _Infos(raw)
    infos.const = const_tensors(model.graph)
    # weights include what ORT folds from them at load time: the exporter shares equal weights through Identity
    # nodes (every layer after the first of an untrained nn.TransformerEncoder), which were keyed as activations
    infos.initializers = {t.name for t in model.graph.initializer} | infos.const
    skip_ln, folded = transformer_fusions(model.graph)
    fused = _fused_nodes(model.graph, infos) | folded
    multiple = max(1, int(channel_multiple))
    return [node_features(n, infos, multiple, n.name in fused, n.name in skip_ln) for n in model.graph.node
            if n.op_type not in SKIP_OPS]


__all__ = ["BASIS_NAMES", "FUSABLE_OPS", "FUSED_KERNEL_OWNERS", "SKIP_SUFFIX", "TREE_NAMES", "NodeFeatures",
           "const_tensors", "graph_features", "node_features", "transformer_fusions"]
