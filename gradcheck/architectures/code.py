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
    return f'init("{p.key}", {p.shape}, {p.scale!r}{shift})'


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
}

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
    if k == "dense":
        return f"torch.nn.Linear({fan_in}, {u})"
    if k == "conv1d":
        pad = '"same"' if layer.padding == "same" else "0"
        return f"torch.nn.Conv1d({fan_in}, {u}, {layer.kernel_size}, padding={pad})"
    if k == "embedding":
        return f"torch.nn.Embedding({spec.input(src).vocab}, {u})"
    if k == "layernorm":
        return f"torch.nn.LayerNorm({fan_in}, eps={S.LAYERNORM_EPSILON!r})"
    if k in ("lstm", "gru"):
        return f"torch.nn.{k.upper()}({fan_in}, {u}, batch_first=True)"
    return None


def _torch_forward(name: str, layer: LayerSpec, srcs: tuple[str, ...]) -> list[str]:
    k, x = layer.kind, srcs[0]
    if k == "merge":
        return [f"{name} = torch.cat([{', '.join(srcs)}], -1)"]
    if k == "pool":
        return [f"{name} = {x}.mean(1)  # average over steps"]
    if k in ("lstm", "gru"):
        last = "" if layer.return_sequences else "[:, -1]"
        return [f"{name} = self.{name}({x})[0]{last}"]
    if k in ("embedding", "layernorm"):
        return [f"{name} = self.{name}({x})"]
    if k == "conv1d":
        pre = f"self.{name}({x}.transpose(1, 2)).transpose(1, 2)"
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
        out += ["        " + line for line in _torch_forward(name, layer, srcs)]
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


def _keras_layer(spec: ModelSpec, name: str, layer: LayerSpec, src: str) -> str:
    k, u = layer.kind, layer.units
    args: list[str] = []
    if k in ("dense", "conv1d"):
        args.append(str(u))
        if k == "conv1d":
            args.append(str(layer.kernel_size))
            if layer.padding != "valid":
                args.append(f'padding="{layer.padding}"')
        if layer.activation != "linear":
            args.append(f'activation="{layer.activation}"')
        for attr in ("kernel_regularizer", "activity_regularizer"):
            r = _keras_reg(getattr(layer, attr))
            if r:
                args.append(f"{attr}={r}")
        cls = "Dense" if k == "dense" else "Conv1D"
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
        cls = "GlobalAveragePooling1D"
    else:
        cls = "Concatenate"
    args += [f'name="{name}"', "dtype=DTYPE"]
    return _call(f"keras.layers.{cls}", args)


def _keras_weights(kind: str, name: str, ps: list[Param]) -> list[str]:
    v = {p.name: _init(p) for p in ps}
    layer = f'model.get_layer("{name}")'
    if kind in ("dense", "conv1d"):
        return _set_weights(layer, [v["kernel"], v["bias"]])
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
    out += ["", ""]
    for i in spec.inputs:
        dt = '"int32"' if i.kind == "tokens" else "DTYPE"
        out.append(
            f'{i.name} = keras.Input(shape={tuple(i.shape)}, name="{i.name}", '
            f"dtype={dt})"
        )
    layers = list(spec.layers())
    for name, layer, srcs in layers:
        arg = f"[{', '.join(srcs)}]" if layer.kind == "merge" else srcs[0]
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
