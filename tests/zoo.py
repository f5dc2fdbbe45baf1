"""A zoo of real torch architectures (transformers) with two heads, for the tests and
benchmarks/zoo.py.

Every model is built from a config with random weights (nothing is downloaded), shrunk
so that one check takes seconds on two CPU cores: 2 layers, hidden size 32, 2 attention
heads, a 512-token vocabulary, 32x32 images, CNN widths 8-16 (MobileNetV2: depth
multiplier 0.25, expansion 2). Each :class:`ZooCase` puts two heads on the model's
first floating output (``last_hidden_state``):

- ``main``: a ``Linear`` on the feature (channel) axis, mean squared error to a target;
- ``aux``: a fixed random projection of the features, mean squared norm;

with weights ``{"main": 1.0, "aux": 0.3}``. The heads' Linear is part of ``case.net``
(``net.body`` is the transformers model, ``net.main`` the head), which is what the
checks differentiate (``params=case.net``).

``plant_bug(case)`` puts an identity autograd.Function whose backward scales the
gradient by ``1 + 1e-3`` on the output of one feed-forward Linear / conv block of the
first block (a forward hook; ``case.planted`` names the module).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = [
    "MODELS",
    "VARIANTS",
    "ZOO",
    "WEIGHTS",
    "BUG_FACTOR",
    "EXPECTED_FD",
    "ZooCase",
    "build",
    "plant_bug",
    "snapshot",
    "assert_same_state",
]

#: Loss weights of the two heads (asymmetric on purpose).
WEIGHTS = {"main": 1.0, "aux": 0.3}
#: The finite-difference verdict an entry must get where it is not "passed": a kink
#: that is really there (issue 10, item 2). MobileNetV2 with fresh BatchNorm
#: statistics has units exactly on ReLU6's kink at 0: a depthwise conv (no bias) over
#: a window that is all 0 after ReLU6, then BatchNorm with mean 0 and bias 0.
EXPECTED_FD: dict[str, tuple[str, ...]] = {"mobilenet_v2_fresh": ("nondifferentiable",)}
#: The planted backward's relative error.
BUG_FACTOR = 1.0 + 1e-3

BATCH = 2
SEQ_LEN = 8
VOCAB = 512
IMAGE = 32
MAIN_OUT = 3
AUX_OUT = 4
CALIBRATION = 8  # images that set BatchNorm's running statistics


@dataclass
class ZooCase:
    """One model with two heads, its seeded inputs and its losses."""

    name: str
    net: torch.nn.ModuleDict  # {"body": transformers model, "main": Linear head}
    inputs: dict[str, torch.Tensor]
    #: Qualified name (inside ``net``) of the module the planted bug goes on.
    planted: str
    #: Fixed random projection of the aux head, and the main head's target.
    projection: torch.Tensor = field(repr=False, default=None)  # type: ignore[assignment]
    target: torch.Tensor = field(repr=False, default=None)  # type: ignore[assignment]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def features(self) -> torch.Tensor:
        """The body's first floating output, channel axis last."""
        out = self.net["body"](**self.inputs)
        first = out.last_hidden_state
        if first.dim() == 4:  # CNN feature map (B, C, H, W)
            first = first.movedim(1, -1)
        return first

    def _main(self, h: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.net["main"](h), self.target)

    def _aux(self, h: torch.Tensor) -> torch.Tensor:
        return (h @ self.projection).pow(2).sum(-1).mean()

    def losses(self) -> dict[str, Callable[[], torch.Tensor]]:
        return {
            "main": lambda: self._main(self.features()),
            "aux": lambda: self._aux(self.features()),
        }

    def total(self) -> torch.Tensor:
        h = self.features()
        return WEIGHTS["main"] * self._main(h) + WEIGHTS["aux"] * self._aux(h)


# --------------------------------------------------------------------- builders
def _bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return (
        BertModel(cfg, add_pooling_layer=False),
        "tokens",
        ["body.encoder.layer.0.intermediate.dense"],
    )


def _gpt2():
    from transformers import GPT2Config, GPT2Model

    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=1,
        eos_token_id=1,
    )
    return GPT2Model(cfg), "tokens", ["body.h.0.mlp.c_fc"]


def _resnet():
    from transformers import ResNetConfig, ResNetModel

    cfg = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
    )
    return ResNetModel(cfg), "pixels", ["body.encoder.stages.0.layers.0.layer.0"]


def _mobilenet_v2():
    from transformers import MobileNetV2Config, MobileNetV2Model

    # narrow (depth multiplier 0.25, expansion 2, 320 output channels): 16 blocks of
    # depthwise convs are slow in float64 on CPU (one kernel call per channel)
    cfg = MobileNetV2Config(
        depth_multiplier=0.25,
        expand_ratio=2.0,
        finegrained_output=False,
        image_size=IMAGE,
    )
    return (
        MobileNetV2Model(cfg, add_pooling_layer=False),
        "pixels",
        ["body.layer.0.expand_1x1"],
    )


def _convnext():
    from transformers import ConvNextConfig, ConvNextModel

    # layer scale 1 (trained ConvNeXts have O(0.1-1)): at the 1e-6 init each block
    # adds 1e-6 of itself to the residual stream, and its tensors' gradients are
    # 1e-9 of the stem's
    cfg = ConvNextConfig(
        num_stages=2,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        image_size=IMAGE,
        layer_scale_init_value=1.0,
    )
    return ConvNextModel(cfg), "pixels", ["body.encoder.stages.0.layers.0.pwconv1"]


def _vit():
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(
        image_size=IMAGE,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    return (
        ViTModel(cfg, add_pooling_layer=False),
        "pixels",
        [
            "body.layers.0.mlp.fc1",  # transformers >= 5
            "body.encoder.layer.0.intermediate.dense",
        ],
    )


_BUILDERS = {
    "bert": _bert,
    "gpt2": _gpt2,
    "resnet": _resnet,
    "mobilenet_v2": _mobilenet_v2,
    "convnext": _convnext,
    "vit": _vit,
}
MODELS = tuple(_BUILDERS)
#: Further zoo entries: name -> (architecture, fresh BatchNorm statistics, module the
#: planted bug goes on). At transformers' init (conv weights with std 0.02) fresh
#: statistics (mean 0, variance 1) leave MobileNetV2's signal un-normalised: units
#: sit exactly on ReLU6's kink (issue 10, item 2) and the first block's gradients
#: are ~1e-26 of the total's (measured: no finite difference can see a bug there),
#: so the bug goes on the last conv, whose effect on the gradient is ~4e-4.
VARIANTS = {"mobilenet_v2_fresh": ("mobilenet_v2", True, "body.conv_1x1")}
ZOO = MODELS + tuple(VARIANTS)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' config warnings and no hub access, ever."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from transformers.utils import logging as hf_logging

            level = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            try:
                yield
            finally:
                hf_logging.set_verbosity(level)
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def build(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> ZooCase:
    """Zoo entry ``name`` (ZOO) with random weights (seeded), eval mode, in ``dtype``.

    BatchNorm running statistics are calibrated (float64, one train-mode pass over a
    seeded batch of CALIBRATION images, cumulative average), as a trained model's
    are; the ``*_fresh`` VARIANTS keep them at their initial mean 0 / variance 1.
    """
    arch, fresh, planted_here = VARIANTS.get(name, (name, False, None))
    torch.manual_seed(seed)
    with _quiet():
        body, kind, planted = _BUILDERS[arch]()
    if planted_here is not None:
        planted = [planted_here]
    head = torch.nn.Linear(_width(body), MAIN_OUT)
    net = torch.nn.ModuleDict({"body": body, "main": head}).to(torch.float64).eval()
    modules = dict(net.named_modules())
    found = [p for p in planted if p in modules]
    if not found:
        raise LookupError(f"{arch}: none of {planted} in the model (transformers?)")

    g = torch.Generator().manual_seed(seed + 1)
    if kind == "tokens":
        # ids from 1: id 0 is BERT's padding_idx, whose embedding row torch never
        # updates by design (a true but intentional gradient mismatch).
        ids = torch.randint(1, VOCAB, (BATCH, SEQ_LEN), generator=g)
        inputs = {"input_ids": ids}
    else:
        pixels = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g, dtype=torch.float64)
        if not fresh:
            _calibrate_batchnorm(body, seed + 2)
        inputs = {"pixel_values": pixels.to(dtype)}
    net.to(dtype)
    case = ZooCase(name=name, net=net, inputs=inputs, planted=found[0])
    with torch.no_grad():
        feats = case.features()
    width = feats.shape[-1]
    case.projection = (
        torch.randn(width, AUX_OUT, generator=g, dtype=torch.float64).to(dtype)
        / width**0.5
    )
    case.target = torch.randn(
        *feats.shape[:-1], MAIN_OUT, generator=g, dtype=torch.float64
    ).to(dtype)
    return case


def _calibrate_batchnorm(body: torch.nn.Module, seed: int) -> None:
    norms = [
        m
        for m in body.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    if not norms:
        return
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(CALIBRATION, 3, IMAGE, IMAGE, generator=g, dtype=torch.float64)
    momenta = [m.momentum for m in norms]
    with torch.no_grad():
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: exactly this batch's statistics
            m.train()
        body(pixel_values=images)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
        m.eval()


def _width(body: torch.nn.Module) -> int:
    cfg = body.config
    for attr in ("hidden_size", "n_embd"):
        if isinstance(getattr(cfg, attr, None), int) and not hasattr(
            cfg, "hidden_sizes"
        ):
            return getattr(cfg, attr)
    # CNNs: run the body once (eval mode: BatchNorm statistics stay) on a dummy
    body.eval()
    with torch.no_grad():
        out = body(pixel_values=torch.zeros(1, 3, IMAGE, IMAGE)).last_hidden_state
    return out.shape[1]


# ------------------------------------------------------------------ planted bug
class ScaledBackward(torch.autograd.Function):
    """Identity forward; the backward scales the gradient by BUG_FACTOR."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * BUG_FACTOR


@contextlib.contextmanager
def plant_bug(case: ZooCase) -> Iterator[str]:
    """Within the block, ``case.planted``'s output goes through ScaledBackward."""
    module = dict(case.net.named_modules())[case.planted]

    def hook(_module, _args, output):
        return ScaledBackward.apply(output)

    handle = module.register_forward_hook(hook)
    try:
        yield case.planted
    finally:
        handle.remove()


# ----------------------------------------------------------------------- state
def snapshot(module: torch.nn.Module) -> dict:
    """Everything a check must leave bit-identical."""
    return {
        "params": {
            n: (p.detach().clone(), p.dtype, p.data_ptr(), p.requires_grad)
            for n, p in module.named_parameters()
        },
        "grads": {
            n: None if p.grad is None else (p.grad.clone(), p.grad.data_ptr())
            for n, p in module.named_parameters()
        },
        "buffers": {
            n: (b.clone(), b.dtype, b.data_ptr()) for n, b in module.named_buffers()
        },
        "training": [(n, m.training) for n, m in module.named_modules()],
    }


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def assert_same_state(before: dict, module: torch.nn.Module) -> None:
    after = snapshot(module)
    assert before["params"].keys() == after["params"].keys()
    for n, (v, dtype, ptr, req) in before["params"].items():
        v2, dtype2, ptr2, req2 = after["params"][n]
        assert (dtype2, ptr2, req2) == (dtype, ptr, req), n
        assert _bits(v) == _bits(v2), f"parameter {n} changed"
    for n, g in before["grads"].items():
        g2 = after["grads"][n]
        assert (g is None) == (g2 is None), f".grad of {n}"
        if g is not None:
            assert g[1] == g2[1] and _bits(g[0]) == _bits(g2[0]), f".grad of {n}"
    assert before["buffers"].keys() == after["buffers"].keys()
    for n, (b, dtype, ptr) in before["buffers"].items():
        b2, dtype2, ptr2 = after["buffers"][n]
        assert (dtype2, ptr2) == (dtype, ptr) and _bits(b) == _bits(b2), n
    assert before["training"] == after["training"]
