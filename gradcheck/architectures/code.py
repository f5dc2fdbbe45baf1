"""A spec as readable Python that rebuilds the model with the framework alone.

This is what a shrunk counterexample shows: a script that builds the model layer by
layer, loads the spec's initial weights (the same draws as
:mod:`gradcheck.architectures.weights`, repeated in a 3-line ``init``), and defines
``evaluate(batch) -> {"outputs", "losses", "regularization", "total"}`` on a batch of
NumPy arrays (see :mod:`gradcheck.architectures.base`). The Keras script also calls
``model.compile`` with ``loss``/``loss_weights`` written in the spec's formats.
"""

from __future__ import annotations

from gradcheck.architectures import spec as S
from gradcheck.architectures.spec import HeadSpec, LayerSpec, ModelSpec, Regularizer
from gradcheck.architectures.weights import Param, parameters
from gradcheck.errors import InvalidArgumentError

__all__ = ["to_code"]

FRAMEWORKS = ("torch", "keras")

_INIT = '''

def init(name, shape, scale, shift=0.0):
    """The spec's initial value of one parameter: a seeded normal draw."""
    rng = np.random.default_rng([SEED, zlib.crc32(name.encode())])
    return shift + scale * rng.standard_normal(shape)
'''


def to_code(spec: ModelSpec, framework: str = "torch", dtype: str = "float64") -> str:
    """Python source rebuilding ``spec`` in ``framework`` ("torch" or "keras")."""
    if framework not in FRAMEWORKS:
        raise InvalidArgumentError(
            f"framework is one of {FRAMEWORKS}, got {framework!r}"
        )
    if dtype not in ("float32", "float64"):
        raise InvalidArgumentError(f"dtype is float32 or float64, got {dtype!r}")
    spec.validate()
    writer = _torch if framework == "torch" else _keras
    return "\n".join(writer(spec, dtype)) + "\n"


def _header(spec: ModelSpec, framework: str) -> list[str]:
    heads = ", ".join(
        f"{h.name} ({h.loss}{_logits_note(h)}, weight {h.weight!r})" for h in spec.heads
    )
    return [
        f'"""A {len(spec.heads)}-head model rebuilt in {framework} from a gradcheck '
        "spec.",
        "",
        f"Heads: {heads}.",
        '"""',
        "",
    ]


def _logits_note(h: HeadSpec) -> str:
    if h.loss not in S.CROSSENTROPIES:
        return ""
    return ", from logits" if h.from_logits else ", from probabilities"


def _call(name: str, args: list[str], indent: str = "") -> str:
    """``name(a, b)``, or one argument per line when that is long."""
    one = f"{indent}{name}({', '.join(args)})"
    if len(one) <= 88:
        return one
    inner = "".join(f"{indent}    {a},\n" for a in args)
    return f"{indent}{name}(\n{inner}{indent})"


def _params_by_layer(spec: ModelSpec) -> dict[str, list[Param]]:
    out: dict[str, list[Param]] = {}
    for p in parameters(spec):
        out.setdefault(p.layer, []).append(p)
    return out


def _init(p: Param) -> str:
    shift = f", {p.shift!r}" if p.shift else ""
    value = f'init("{p.key}", {p.shape}, {p.scale!r}{shift})'
    return f"np.exp({value})" if p.exp else value


def _penalty(r: Regularizer, x: str) -> list[str]:
    terms = []
    if r.l1:
        terms.append(f"{r.l1!r} * {x}.abs().sum()")
    if r.l2:
        terms.append(f"{r.l2!r} * {x}.square().sum()")
    return terms or ["0.0"]


# ---------------------------------------------------------------- torch
_TORCH_ACT = {
    "linear": "{}",
    "tanh": "torch.tanh({})",
    "sigmoid": "torch.sigmoid({})",
    "gelu": "F.gelu({})",
    "softplus": "F.softplus({})",
    "elu": "F.elu({})",
    "relu": "F.relu({})",
    "leaky_relu": "F.leaky_relu({}, " + repr(S.LEAKY_SLOPE) + ")",
    "softmax": "torch.softmax({}, -1)",
    "silu": "F.silu({})",
    "relu6": "F.relu6({})",
    "hard_swish": "F.hardswish({})",
}

_TORCH_ATTENTION = f'''

def attention(x, m, heads, mask, causal):
    """Keras' MultiHeadAttention (self-attention): scores q.k times Keras'
    1/sqrt(key_dim) rounded to float32; masked scores {S.ATTENTION_MASK_VALUE!r}."""
    n, t, _ = x.shape

    def split(h):
        return h.reshape(n, t, heads, -1).transpose(1, 2)

    q, k, v = split(m["query"](x)), split(m["key"](x)), split(m["value"](x))
    scale = float(np.float32(1.0 / np.sqrt(q.shape[-1])))
    scores = (q @ k.transpose(-1, -2)) * scale
    keep = torch.ones(t, t, dtype=torch.bool)
    if causal:
        keep = torch.tril(keep)
    keep = keep.expand(n, 1, t, t)
    if mask is not None:
        keep = keep & (mask > 0.5)[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~keep, {S.ATTENTION_MASK_VALUE!r}), -1)
    return m["output"]((probs @ v).transpose(1, 2).reshape(n, t, -1))
'''

_TORCH_LOSS = {
    "mse": "(y - t).square().mean(-1)",
    "mae": "(y - t).abs().mean(-1)",
    "huber": f'F.huber_loss(y, t, reduction="none", delta={S.HUBER_DELTA!r}).mean(-1)',
    ("categorical_crossentropy", True): "-(t * torch.log_softmax(y, -1)).sum(-1)",
    ("categorical_crossentropy", False): (
        "-(t * (y / y.sum(-1, keepdim=True)).clamp(EPS, 1 - EPS).log()).sum(-1)"
    ),
    (
        "sparse_categorical_crossentropy",
        True,
    ): 'F.cross_entropy(y, t, reduction="none")',
    ("sparse_categorical_crossentropy", False): (
        'F.cross_entropy(y.clamp(EPS, 1 - EPS).log(), t, reduction="none")'
    ),
    ("binary_crossentropy", True): (
        'F.binary_cross_entropy_with_logits(y, t, reduction="none").mean(-1)'
    ),
    ("binary_crossentropy", False): (
        "-(t * p.log() + (1 - t) * (1 - p).log()).mean(-1)"
    ),
}


def _torch_module(spec: ModelSpec, name: str, layer: LayerSpec, src: str) -> str | None:
    shapes = spec.shapes()
    k, u, fan_in = layer.kind, layer.units, shapes[src][-1]
    ks, st = layer.kernel_size, layer.strides
    if k == "dense":
        return f"torch.nn.Linear({fan_in}, {u})"
    if k == "conv1d":
        pad = '"same"' if layer.padding == "same" else "0"
        return f"torch.nn.Conv1d({fan_in}, {u}, {layer.kernel_size}, padding={pad})"
    if k == "conv2d":
        return f"torch.nn.Conv2d({fan_in}, {u}, {ks}, {st})"
    if k == "depthwise_conv2d":
        return f"torch.nn.Conv2d({fan_in}, {fan_in * u}, {ks}, {st}, groups={fan_in})"
    if k == "separable_conv2d":
        return (
            "torch.nn.ModuleDict({"
            f'"depthwise": torch.nn.Conv2d({fan_in}, {fan_in}, {ks}, {st}, '
            f"groups={fan_in}, bias=False), "
            f'"pointwise": torch.nn.Conv2d({fan_in}, {u}, 1)}})'
        )
    if k == "batchnorm":
        return (
            f"torch.nn.BatchNorm1d({fan_in}, eps={S.BATCHNORM_EPSILON!r}, "
            f"momentum={S.TORCH_BATCHNORM_MOMENTUM!r})"
        )
    if k == "attention":
        hk = layer.num_heads * u
        parts = ", ".join(
            f'"{p}": torch.nn.Linear({fan_in}, {hk})' for p in ("query", "key", "value")
        )
        return (
            f'torch.nn.ModuleDict({{{parts}, "output": torch.nn.Linear({hk}, '
            f"{fan_in})}})"
        )
    if k == "embedding":
        pad = "" if layer.padding_idx is None else f", padding_idx={layer.padding_idx}"
        return f"torch.nn.Embedding({spec.input(src).vocab}, {u}{pad})"
    if k == "layernorm":
        return f"torch.nn.LayerNorm({fan_in}, eps={S.LAYERNORM_EPSILON!r})"
    if k in ("lstm", "gru"):
        return f"torch.nn.{k.upper()}({fan_in}, {u}, batch_first=True)"
    return None


def _torch_forward(
    spec: ModelSpec, name: str, layer: LayerSpec, srcs: tuple[str, ...]
) -> list[str]:
    k, x = layer.kind, srcs[0]
    if k == "merge":
        return [f"{name} = torch.cat([{', '.join(srcs)}], -1)"]
    if k == "add":
        return [f"{name} = {' + '.join(srcs)}  # residual"]
    if k == "pool":
        rank = len(spec.shapes()[x])
        if rank == 2:
            return [f"{name} = {x}.mean(1)  # average over steps"]
        return [f"{name} = {x}.mean((1, 2))  # global average over pixels"]
    if k in ("lstm", "gru"):
        last = "" if layer.return_sequences else "[:, -1]"
        return [f"{name} = self.{name}({x})[0]{last}"]
    if k in ("embedding", "layernorm"):
        return [f"{name} = self.{name}({x})"]
    if k == "dropout":
        return [f"{name} = F.dropout({x}, {layer.rate!r}, training={layer.training})"]
    if k in ("maxpool2d", "avgpool2d"):
        fn = "F.max_pool2d" if k == "maxpool2d" else "F.avg_pool2d"
        return [
            f"{name} = {fn}({x}.permute(0, 3, 1, 2), {layer.kernel_size}, "
            f"{layer.strides}).permute(0, 2, 3, 1)"
        ]
    if k == "batchnorm":
        mode = "batch statistics" if layer.training else "moving statistics"
        return [
            f"{name} = F.batch_norm(  # {mode}, over the channels (last) axis",
            f"    {x}.movedim(-1, 1),",
            f"    self.{name}.running_mean,",
            f"    self.{name}.running_var,",
            f"    self.{name}.weight,",
            f"    self.{name}.bias,",
            f"    training={layer.training},",
            f"    momentum={S.TORCH_BATCHNORM_MOMENTUM!r},",
            f"    eps={S.BATCHNORM_EPSILON!r},",
            ").movedim(1, -1)",
        ]
    if k == "attention":
        mask = srcs[1] if len(srcs) > 1 else "None"
        return [
            f"{name} = attention({x}, self.{name}, {layer.num_heads}, {mask}, "
            f"causal={layer.causal})"
        ]
    if k == "conv1d":
        pre = f"self.{name}({x}.transpose(1, 2)).transpose(1, 2)"
    elif k in ("conv2d", "depthwise_conv2d", "separable_conv2d"):
        img = f"{x}.permute(0, 3, 1, 2)"
        if layer.padding == "same":
            h, w = spec.shapes()[x][:2]
            (t, b), (left, r) = (
                S.same_padding(d, layer.kernel_size, layer.strides) for d in (h, w)
            )
            img = f"F.pad({x}.permute(0, 3, 1, 2), ({left}, {r}, {t}, {b}))"
        if k == "separable_conv2d":
            call = f'self.{name}["pointwise"](self.{name}["depthwise"]({img}))'
        else:
            call = f"self.{name}({img})"
        pre = f"{call}.permute(0, 2, 3, 1)"
    else:
        pre = f"self.{name}({x})"
    lines = [f"{name} = {_TORCH_ACT[layer.activation].format(pre)}"]
    if layer.activity_regularizer is not None:
        terms = " + ".join(_penalty(layer.activity_regularizer, name))
        lines.append(f"activity = activity + ({terms}) / {name}.shape[0]")
    return lines


def _torch_weights(kind: str, name: str, ps: list[Param]) -> list[str]:
    m = f"model.{name}"
    v = {p.name: _init(p) for p in ps}
    if kind in ("dense", "conv1d"):
        t, note = (
            (".T", "(in, out)")
            if kind == "dense"
            else (
                ".transpose(2, 1, 0)",
                "(kernel_size, in, out)",
            )
        )
        return [
            f"w = {v['kernel']}  # {note}",
            f"{m}.weight.copy_(tensor(w{t}))",
            f"{m}.bias.copy_(tensor({v['bias']}))",
        ]
    if kind == "embedding":
        return [f"{m}.weight.copy_(tensor({v['embeddings']}))"]
    if kind == "layernorm":
        return [
            f"{m}.weight.copy_(tensor({v['gamma']}))",
            f"{m}.bias.copy_(tensor({v['beta']}))",
        ]
    if kind == "batchnorm":
        return [
            f"{m}.weight.copy_(tensor({v['gamma']}))",
            f"{m}.bias.copy_(tensor({v['beta']}))",
            f"{m}.running_mean.copy_(tensor({v['moving_mean']}))",
            f"{m}.running_var.copy_(tensor({v['moving_variance']}))",
        ]
    if kind == "conv2d":
        return [
            f"w = {v['kernel']}  # (k, k, in, out)",
            f"{m}.weight.copy_(tensor(w.transpose(3, 2, 0, 1)))",
            f"{m}.bias.copy_(tensor({v['bias']}))",
        ]
    if kind == "depthwise_conv2d":
        k, _, c, mult = ps[0].shape
        return [
            f"w = {v['depthwise_kernel']}  # (k, k, in, multiplier)",
            f"w = w.transpose(2, 3, 0, 1).reshape({c * mult}, 1, {k}, {k})",
            f"{m}.weight.copy_(tensor(w))",
            f"{m}.bias.copy_(tensor({v['bias']}))",
        ]
    if kind == "separable_conv2d":
        k, _, c, _ = ps[0].shape
        return [
            f"w = {v['depthwise_kernel']}  # (k, k, in, 1)",
            f'{m}["depthwise"].weight.copy_(',
            f"    tensor(w.transpose(2, 3, 0, 1).reshape({c}, 1, {k}, {k}))",
            ")",
            f"w = {v['pointwise_kernel']}  # (1, 1, in, out)",
            f'{m}["pointwise"].weight.copy_(tensor(w.transpose(3, 2, 0, 1)))',
            f'{m}["pointwise"].bias.copy_(tensor({v["bias"]}))',
        ]
    if kind == "attention":
        lines = ["# attention: kernels (in, heads, key_dim) / (heads, key_dim, in)"]
        for part in ("query", "key", "value", "output"):
            lines += [
                f"w = {v[part + '_kernel']}",
                f'{m}["{part}"].weight.copy_(',
                f"    tensor(w.reshape({'-1, w.shape[-1]' if part == 'output' else 'w.shape[0], -1'}).T)",
                ")",
                f'{m}["{part}"].bias.copy_(tensor({v[part + "_bias"]}.reshape(-1)))',
            ]
        return lines
    g, _, u = ps[0].shape
    gates = "i, f, g, o" if kind == "lstm" else "r, z, n"
    lines = [
        f"# {kind}: gates {gates} stacked row-wise, each block (units, in)",
        f"k = {v['input_kernel']}",
        f"r = {v['recurrent_kernel']}",
        f"{m}.weight_ih_l0.copy_(tensor(k.transpose(0, 2, 1).reshape({g * u}, -1)))",
        f"{m}.weight_hh_l0.copy_(tensor(r.transpose(0, 2, 1).reshape({g * u}, {u})))",
    ]
    if kind == "lstm":
        lines += [
            f"b = {v['bias']}",
            f"{m}.bias_ih_l0.copy_(tensor(b.reshape(-1)))",
            f"{m}.bias_hh_l0.zero_()  # Keras has one bias",
        ]
    else:
        lines += [
            f"b = {v['input_bias']}",
            f"c = {v['recurrent_bias']}",
            f"{m}.bias_ih_l0.copy_(tensor(b.reshape(-1)))",
            f"{m}.bias_hh_l0.copy_(tensor(c.reshape(-1)))",
        ]
    return lines


def _torch(spec: ModelSpec, dtype: str) -> list[str]:
    out = _header(spec, "PyTorch")
    out += [
        "import zlib",
        "",
        "import numpy as np",
        "import torch",
        "import torch.nn.functional as F",
        "",
        f"SEED = {spec.seed}",
        f"DTYPE = torch.{dtype}",
        f"EPS = {S.PROBABILITY_EPSILON!r}  # Keras clips probabilities to [EPS, 1-EPS]",
        f"WEIGHTS = {spec.weights!r}",
    ]
    out += _INIT.splitlines()
    layers = list(spec.layers())
    if any(layer.kind == "attention" for _, layer, _ in layers):
        out += _TORCH_ATTENTION.splitlines()
    activity = any(layer.activity_regularizer for _, layer, _ in layers)
    out += ["", "", "class Model(torch.nn.Module):", "    def __init__(self):"]
    out += ["        super().__init__()"]
    for name, layer, srcs in layers:
        module = _torch_module(spec, name, layer, srcs[0])
        if module is not None:
            out.append(f"        self.{name} = {module}")
    args = ", ".join(i.name for i in spec.inputs)
    out += ["", f"    def forward(self, {args}):"]
    if activity:
        out.append("        activity = torch.zeros((), dtype=DTYPE)")
    for name, layer, srcs in layers:
        out += ["        " + line for line in _torch_forward(spec, name, layer, srcs)]
    outputs = ", ".join(f'"{h}": {h}' for h in spec.head_names)
    ret = f"{{{outputs}}}"
    out.append(
        f"        return {ret}, activity" if activity else f"        return {ret}"
    )
    out += [
        "",
        "",
        "def tensor(a):",
        "    return torch.as_tensor(np.asarray(a), dtype=DTYPE)",
    ]
    out += ["", "", "model = Model().to(DTYPE)", "with torch.no_grad():"]
    kinds = {name: layer.kind for name, layer, _ in layers}
    for name, ps in _params_by_layer(spec).items():
        out += ["    " + line for line in _torch_weights(kinds[name], name, ps)]
    out += _torch_evaluate(spec, activity)
    return out


def _torch_evaluate(spec: ModelSpec, activity: bool) -> list[str]:
    out = [
        "",
        "",
        "def reduce(per_example, sample_weight=None):",
        '    """Keras\' sum_over_batch_size: sum(loss * sample_weight) / N."""',
        "    if sample_weight is not None:",
        "        per_example = per_example * tensor(sample_weight)",
        "    return per_example.sum() / per_example.shape[0]",
        "",
        "",
        "def evaluate(batch):",
        '    x, targets = batch["inputs"], batch["targets"]',
        '    sw = batch.get("sample_weights") or {}',
    ]
    args = []
    for i in spec.inputs:
        if i.kind == "tokens":
            args.append(
                f'torch.as_tensor(np.asarray(x["{i.name}"]), dtype=torch.int64)'
            )
        else:
            args.append(f'tensor(x["{i.name}"])')
    lhs = "outputs, activity" if activity else "outputs"
    out.append(_call(f"{lhs} = model", args, "    "))
    out.append("    losses = {}")
    for h in spec.heads:
        out.append(f'    y = outputs["{h.name}"]')
        if h.loss == "sparse_categorical_crossentropy":
            out.append(
                f'    t = torch.as_tensor(np.asarray(targets["{h.name}"]), '
                "dtype=torch.int64)"
            )
        else:
            out.append(f'    t = tensor(targets["{h.name}"])')
        if h.loss == "binary_crossentropy" and not h.from_logits:
            out.append("    p = y.clamp(EPS, 1 - EPS)")
        key = h.loss if h.loss not in S.CROSSENTROPIES else (h.loss, h.from_logits)
        args = [_TORCH_LOSS[key], f'sw.get("{h.name}")']
        out.append(_call(f'losses["{h.name}"] = reduce', args, "    "))
    reg = ["activity"] if activity else []
    for name, layer, _ in spec.layers():
        if layer.kernel_regularizer is not None:
            reg += _penalty(layer.kernel_regularizer, f"model.{name}.weight")
    if reg:
        out.append("    regularization = " + _join_terms(reg, "    "))
    else:
        out.append("    regularization = torch.zeros((), dtype=DTYPE)")
    out += [
        "    total = regularization + sum(WEIGHTS[n] * v for n, v in losses.items())",
        "    return {",
        '        "outputs": outputs,',
        '        "losses": losses,',
        '        "regularization": regularization,',
        '        "total": total,',
        "    }",
    ]
    return out


def _join_terms(terms: list[str], indent: str) -> str:
    one = " + ".join(terms)
    if len(one) + len(indent) + 20 <= 88:
        return one
    return (
        "(\n"
        + "".join(f"{indent}    {'+ ' if i else ''}{t}\n" for i, t in enumerate(terms))
        + f"{indent})"
    )


# ---------------------------------------------------------------- keras
_KERAS_LOSS = {
    "mse": "MeanSquaredError",
    "mae": "MeanAbsoluteError",
    "huber": "Huber",
    "categorical_crossentropy": "CategoricalCrossentropy",
    "sparse_categorical_crossentropy": "SparseCategoricalCrossentropy",
    "binary_crossentropy": "BinaryCrossentropy",
}


def _keras_reg(r: Regularizer | None) -> str | None:
    if r is None:
        return None
    return f"keras.regularizers.L1L2(l1={r.l1!r}, l2={r.l2!r})"


_KERAS_PINNED = '''

class PinnedBatchNormalization(keras.layers.BatchNormalization):
    """BatchNormalization in one mode, whatever training= the model gets."""

    def __init__(self, *args, pinned_training=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.pinned_training = pinned_training

    def call(self, inputs, training=None, mask=None):
        return super().call(inputs, training=self.pinned_training, mask=mask)


class PinnedDropout(keras.layers.Dropout):
    """Dropout in one mode, whatever training= the model gets."""

    def __init__(self, *args, pinned_training=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.pinned_training = pinned_training

    def call(self, inputs, training=None):
        return super().call(inputs, training=self.pinned_training)
'''

_KERAS_MASK = '''

def attention_mask(mask):
    """A key padding mask (batch, steps), 1 = a real step -> (batch, steps, steps)."""
    keep = keras.ops.greater(mask, 0.5)
    return keras.ops.repeat(keras.ops.expand_dims(keep, 1), mask.shape[1], axis=1)
'''

_KERAS_CLASSES = {
    "dense": "Dense",
    "conv1d": "Conv1D",
    "conv2d": "Conv2D",
    "depthwise_conv2d": "DepthwiseConv2D",
    "separable_conv2d": "SeparableConv2D",
    "maxpool2d": "MaxPooling2D",
    "avgpool2d": "AveragePooling2D",
}


def _keras_layer(spec: ModelSpec, name: str, layer: LayerSpec, src: str) -> str:
    k, u = layer.kind, layer.units
    args: list[str] = []
    prefix = "keras.layers."
    if k in _KERAS_CLASSES:
        if k not in ("depthwise_conv2d", "maxpool2d", "avgpool2d"):
            args.append(str(u))
        if k != "dense":
            args.append(str(layer.kernel_size))
        if layer.strides != 1 or k in ("maxpool2d", "avgpool2d"):
            args.append(f"strides={layer.strides}")  # a pool's default: its size
        if layer.padding != "valid":
            args.append(f'padding="{layer.padding}"')
        if k == "depthwise_conv2d":
            args.append(f"depth_multiplier={u}")
        if layer.activation != "linear":
            args.append(f'activation="{layer.activation}"')
        for attr in ("kernel_regularizer", "activity_regularizer"):
            r = _keras_reg(getattr(layer, attr))
            if r:
                args.append(f"{attr}={r}")
        cls = _KERAS_CLASSES[k]
    elif k == "batchnorm":
        args += [
            f"momentum={S.BATCHNORM_MOMENTUM!r}",
            f"epsilon={S.BATCHNORM_EPSILON!r}",
            f"pinned_training={layer.training}",
        ]
        prefix, cls = "", "PinnedBatchNormalization"
    elif k == "dropout":
        args += [repr(layer.rate), f"pinned_training={layer.training}"]
        prefix, cls = "", "PinnedDropout"
    elif k == "attention":
        args += [str(layer.num_heads), str(u)]
        cls = "MultiHeadAttention"
    elif k == "add":
        cls = "Add"
    elif k == "embedding":
        args += [str(spec.input(src).vocab), str(u)]
        cls = "Embedding"
    elif k == "layernorm":
        args.append(f"epsilon={S.LAYERNORM_EPSILON!r}")
        cls = "LayerNormalization"
    elif k in ("lstm", "gru"):
        args.append(str(u))
        if layer.return_sequences:
            args.append("return_sequences=True")
        if k == "gru":
            args.append("reset_after=True")
        cls = k.upper()
    elif k == "pool":
        rank = len(spec.shapes()[src])
        cls = "GlobalAveragePooling2D" if rank == 3 else "GlobalAveragePooling1D"
    else:
        cls = "Concatenate"
    args += [f'name="{name}"', "dtype=DTYPE"]
    return _call(f"{prefix}{cls}", args)


def _keras_weights(kind: str, name: str, ps: list[Param]) -> list[str]:
    v = {p.name: _init(p) for p in ps}
    layer = f'model.get_layer("{name}")'
    if kind in ("dense", "conv1d", "conv2d"):
        return _set_weights(layer, [v["kernel"], v["bias"]])
    if kind == "depthwise_conv2d":
        return _set_weights(layer, [v["depthwise_kernel"], v["bias"]])
    if kind == "separable_conv2d":
        return _set_weights(
            layer, [v["depthwise_kernel"], v["pointwise_kernel"], v["bias"]]
        )
    if kind == "batchnorm":
        names = ("gamma", "beta", "moving_mean", "moving_variance")
        return _set_weights(layer, [v[n] for n in names])
    if kind == "attention":
        names = [
            f"{part}_{what}"
            for part in ("query", "key", "value", "output")
            for what in ("kernel", "bias")
        ]
        return _set_weights(layer, [v[n] for n in names])
    if kind == "embedding":
        return _set_weights(layer, [v["embeddings"]])
    if kind == "layernorm":
        return _set_weights(layer, [v["gamma"], v["beta"]])
    g, n_in, u = ps[0].shape
    if kind == "lstm":
        lines = [
            "# lstm: gates i, f, c, o stacked column-wise, one bias",
            f"k = {v['input_kernel']}",
            f"r = {v['recurrent_kernel']}",
            f"b = {v['bias']}.reshape(-1)",
        ]
    else:
        lines = [
            "# gru (reset_after): gates z, r, h stacked column-wise, the neutral",
            "# order is r, z, h; bias rows: input bias, recurrent bias",
            f"k = {v['input_kernel']}[[1, 0, 2]]",
            f"r = {v['recurrent_kernel']}[[1, 0, 2]]",
            "b = np.stack([",
            f"    {v['input_bias']}[[1, 0, 2]].reshape(-1),",
            f"    {v['recurrent_bias']}[[1, 0, 2]].reshape(-1),",
            "])",
        ]
    return lines + _set_weights(
        layer,
        [
            f"k.transpose(1, 0, 2).reshape({n_in}, {g * u})",
            f"r.transpose(1, 0, 2).reshape({u}, {g * u})",
            "b",
        ],
    )


def _set_weights(layer: str, items: list[str]) -> list[str]:
    one = f"{layer}.set_weights([{', '.join(items)}])"
    if len(one) <= 88:
        return [one]
    return [f"{layer}.set_weights(["] + [f"    {i}," for i in items] + ["])"]


def _keras_loss(h: HeadSpec) -> str:
    args = []
    if h.loss in S.CROSSENTROPIES:
        args.append(f"from_logits={h.from_logits}")
    args.append("dtype=DTYPE")
    return f"keras.losses.{_KERAS_LOSS[h.loss]}({', '.join(args)})"


def _shaped(values: dict[str, str], fmt: str) -> str:
    if fmt == "dict":
        return "{" + ", ".join(f'"{k}": {v}' for k, v in values.items()) + "}"
    if fmt == "list":
        return "[" + ", ".join(values.values()) + "]"
    return next(iter(values.values()))


def _keras(spec: ModelSpec, dtype: str) -> list[str]:
    out = _header(spec, "Keras")
    out += [
        "import os",
        "import zlib",
        "",
        'os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")',
        "",
        "import keras  # noqa: E402",
        "import numpy as np  # noqa: E402",
        "",
        f"SEED = {spec.seed}",
        f'DTYPE = "{dtype}"',
        f"HEADS = {list(spec.head_names)!r}",
        f"WEIGHTS = {spec.weights!r}",
    ]
    out += _INIT.splitlines()
    layers = list(spec.layers())
    if any(layer.kind in ("batchnorm", "dropout") for _, layer, _ in layers):
        out += _KERAS_PINNED.splitlines()
    if any(layer.kind == "attention" and len(srcs) > 1 for _, layer, srcs in layers):
        out += _KERAS_MASK.splitlines()
    out += ["", ""]
    for i in spec.inputs:
        dt = '"int32"' if i.kind == "tokens" else "DTYPE"
        out.append(
            f'{i.name} = keras.Input(shape={tuple(i.shape)}, name="{i.name}", '
            f"dtype={dt})"
        )
    for name, layer, srcs in layers:
        if layer.kind in ("merge", "add"):
            arg = f"[{', '.join(srcs)}]"
        elif layer.kind == "attention":
            arg = f"{srcs[0]}, {srcs[0]}"
            if len(srcs) > 1:
                arg += f", attention_mask=attention_mask({srcs[1]})"
            if layer.causal:
                arg += ", use_causal_mask=True"
        else:
            arg = srcs[0]
        out.append(f"{name} = {_keras_layer(spec, name, layer, srcs[0])}({arg})")
    ins = [i.name for i in spec.inputs]
    ins_s = ins[0] if len(ins) == 1 else f"[{', '.join(ins)}]"
    if spec.output_structure == "dict":
        outs = "{" + ", ".join(f'"{h}": {h}' for h in spec.head_names) + "}"
    else:
        outs = f"[{', '.join(spec.head_names)}]"
    out.append(_call("model = keras.Model", [ins_s, outs]))
    out += ["", "# initial weights (kernels are applied as x @ kernel)"]
    kinds = {name: layer.kind for name, layer, _ in layers}
    for name, ps in _params_by_layer(spec).items():
        out += _keras_weights(kinds[name], name, ps)
    losses = {h.name: _keras_loss(h) for h in spec.heads}
    out += ["", "LOSSES = {"]
    out += [f'    "{k}": {v},' for k, v in losses.items()]
    out += ["}"]
    if spec.loss_format == "dict":
        loss_arg = "LOSSES"
    else:
        loss_arg = _shaped({k: f'LOSSES["{k}"]' for k in losses}, spec.loss_format)
    if spec.weights_format == "dict":
        weight_arg = "WEIGHTS"
    else:
        weights = {k: repr(w) for k, w in spec.weights.items()}
        weight_arg = _shaped(weights, spec.weights_format)
    out.append(
        _call("model.compile", [f"loss={loss_arg}", f"loss_weights={weight_arg}"])
    )
    out += _keras_evaluate(spec)
    return out


def _keras_evaluate(spec: ModelSpec) -> list[str]:
    out = [
        "",
        "",
        "def evaluate(batch):",
        '    x, targets = batch["inputs"], batch["targets"]',
        '    sw = batch.get("sample_weights") or {}',
    ]
    args = []
    for i in spec.inputs:
        dt = '"int32"' if i.kind == "tokens" else "DTYPE"
        args.append(f'np.asarray(x["{i.name}"], {dt})')
    arg = args[0] if len(args) == 1 else "[" + ", ".join(args) + "]"
    if spec.output_structure == "dict":
        out.append(f"    outputs = model({arg})")
    elif len(spec.heads) == 1:  # Keras returns a lone output unwrapped
        out.append(f'    outputs = {{"{spec.heads[0].name}": model({arg})}}')
    else:
        out.append(f"    outputs = dict(zip(HEADS, model({arg})))")
    out += [
        "    losses = {",
        "        n: LOSSES[n](targets[n], outputs[n], sample_weight=sw.get(n))",
        "        for n in HEADS",
        "    }",
        "    # kernel penalties + activity penalties / batch size (unweighted)",
        "    regularization = sum(model.losses, np.zeros((), DTYPE))",
        "    total = regularization + sum(WEIGHTS[n] * losses[n] for n in HEADS)",
        "    return {",
        '        "outputs": outputs,',
        '        "losses": losses,',
        '        "regularization": regularization,',
        '        "total": total,',
        "    }",
    ]
    return out


S.set_code_printer(to_code)
