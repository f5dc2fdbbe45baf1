"""transformers models by model type (``hf:<model_type>``): a shrunk config, random
weights, inferred inputs. Nothing is downloaded.

Used by :mod:`gradcheck.models`; imports transformers and torch only when called.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
from collections.abc import Mapping
from typing import Any

from gradcheck.errors import InvalidArgumentError

__all__ = ["build", "expand_all", "load_config", "shrink_config"]

#: the shrink: every config (nested text/vision/audio configs too) gets at most
LAYERS = 2
HIDDEN = 32
HEADS = 2
FFN = 64
VOCAB = 1024
IMAGE = 64
EXPERTS = 4
SOURCE_POSITIONS = 32
#: the first stage's width of a staged backbone that keeps all its stages (Swin)
STAGED_WIDTH = 16
TOP_K = 2

_LAYER_KEYS = (
    "num_hidden_layers",
    "num_layers",
    "n_layer",
    "n_layers",
    "num_encoder_layers",
    "num_decoder_layers",
    "encoder_layers",
    "decoder_layers",
    "num_blocks",
)
_HIDDEN_KEYS = ("hidden_size", "d_model", "n_embd", "dim", "embed_dim")
_HEAD_KEYS = (
    "num_attention_heads",
    "n_head",
    "n_heads",
    "num_heads",
    "encoder_attention_heads",
    "decoder_attention_heads",
)
_KV_KEYS = ("num_key_value_heads", "num_kv_heads")
_FFN_KEYS = (
    "intermediate_size",
    "d_ff",
    "ffn_dim",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "n_inner",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
)
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
_TOPK_KEYS = ("num_experts_per_tok", "moe_topk")
#: inputs the model may take, by kind
TEXT, IMAGE_INPUT, AUDIO = (
    "input_ids",
    "pixel_values",
    ("input_values", "input_features"),
)
INPUT_KINDS = (TEXT, IMAGE_INPUT, *AUDIO)


def _is_config(obj: Any) -> bool:
    from transformers import PretrainedConfig

    return isinstance(obj, PretrainedConfig)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_config(model_type: str) -> Any:
    """``AutoConfig.for_model(model_type)``; an unknown type is a ValueError that
    names the closest known ones (not transformers' list of all of them)."""
    import difflib

    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        close = difflib.get_close_matches(model_type, CONFIG_MAPPING_NAMES, n=4)
        hint = f"; close: {', '.join(close)}" if close else ""
        raise ValueError(
            f"transformers {transformers.__version__} has no model type "
            f"{model_type!r} ({len(CONFIG_MAPPING_NAMES)} known{hint})"
        )
    return AutoConfig.for_model(model_type)


def shrink_config(
    cfg: Any, _seen: set[int] | None = None, *, each_kind: bool = True
) -> Any:
    """Shrink ``cfg`` in place (and every nested config): layers, width, heads,
    vocabulary, image size, experts; every dropout 0; no cache. Returns it.

    Per-layer lists keep one layer of each kind (``layer_types`` with sliding and
    full attention keeps one of each; ``each_kind=False``: the first layers);
    per-layer overrides of a heterogeneous config (transformers'
    ``per_layer_config``) follow the layers kept."""
    seen = _seen if _seen is not None else set()
    if id(cfg) in seen:
        return cfg
    seen.add(id(cfg))
    # a heterogeneous config refuses to read per-layer attributes globally: take
    # its per-layer overrides off while shrinking, put the kept layers' back after
    hetero = cfg.__dict__.pop("_heterogeneity_spec", None)
    attrs = dict(vars(cfg))
    for key, value in attrs.items():
        if _is_config(value):
            shrink_config(value, seen, each_kind=each_kind)
        elif isinstance(value, Mapping) and key.endswith("_config"):
            continue  # a dict config is rebuilt by its parent; leave it
    old_layers: set[int] = set()
    kept = _kept_layers(cfg) if each_kind else list(range(LAYERS))

    def cap(keys: tuple[str, ...], limit: int, layers: bool = False) -> None:
        for key in keys:
            value = getattr(cfg, key, None)
            if _int(value) and value > limit:
                if layers:
                    old_layers.add(value)
                _set(cfg, key, limit)

    # a staged backbone (Swin: num_layers == len(depths)) keeps its stages, whose
    # names, heads and outputs are per stage (Mask2Former reads 3 levels); each
    # stage's depth is capped to 1 below, and its width (doubling per stage)
    # starts at STAGED_WIDTH
    depths = vars(cfg).get("depths")
    staged = isinstance(depths, (list, tuple)) and vars(cfg).get("num_layers") == len(
        depths
    )
    aliases = getattr(cfg, "attribute_map", {}) or {}  # num_hidden_layers -> num_layers
    layer_keys = tuple(
        k for k in _LAYER_KEYS if not (staged and "num_layers" in (k, aliases.get(k)))
    )
    cap(layer_keys, max(LAYERS, len(kept)), layers=True)
    for key in _HIDDEN_KEYS:
        if _int(getattr(cfg, key, None)) and getattr(cfg, key) > HIDDEN:
            _set(cfg, key, HIDDEN)
    if staged and _int(vars(cfg).get("embed_dim")) and cfg.embed_dim > STAGED_WIDTH:
        _set(cfg, "embed_dim", STAGED_WIDTH)
    cap(_HEAD_KEYS, HEADS)
    cap(_KV_KEYS, HEADS)
    # per-stage lists (Swin, ConvNeXt, ResNet, wav2vec2's feature extractor)
    cap_list(cfg, _HEAD_KEYS, HEADS)
    cap_list(cfg, _STAGE_WIDTH_KEYS, HIDDEN)
    cap_list(cfg, _STAGE_DEPTH_KEYS, 1)
    cap(_FFN_KEYS, FFN)
    cap_list(cfg, _FFN_KEYS, FFN)  # per-layer widths (Gemma 3n)
    # Gemma 3n's per-layer input embedding: layers x this wide per token
    cap(("hidden_size_per_layer_input",), 8)
    # GLM-5-Next's indexer scores pools of 16 tokens: none in 8 tokens (a top-0
    # selection); pools of 2 (4 of them)
    cap(("index_kpool",), 2)
    # DETR-style object queries: 300 top-k picks from 84 anchors at 64 x 64
    # (RT-DETR, D-FINE: 'selected index k out of range'); 16 queries
    cap(("num_queries",), 16)
    cap(("vocab_size",), VOCAB)
    # audio encoders that take exactly 2 x max_source_positions frames (Whisper):
    # 64 frames, not 3,000 (the input follows it, see infer_inputs)
    cap(("max_source_positions",), SOURCE_POSITIONS)
    cap(_EXPERT_KEYS, EXPERTS)
    experts = min(
        [getattr(cfg, k) for k in _EXPERT_KEYS if _int(getattr(cfg, k, None))]
        or [EXPERTS]
    )
    cap(_TOPK_KEYS, min(TOP_K, experts))
    if any(_int(getattr(cfg, k, None)) for k in _EXPERT_KEYS):
        for key in _TOPK_KEYS:  # a default left unset (deepseek_v2): top-2
            if key in vars(cfg) and vars(cfg)[key] is None:
                _set(cfg, key, min(TOP_K, experts))
    _cap_by_name(cfg)
    heads = getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    if _int(getattr(cfg, "head_dim", None)) and _int(heads) and _int(hidden):
        _set(cfg, "head_dim", max(hidden // heads, 4))
    _fit_mla(cfg)
    size = getattr(cfg, "image_size", None)
    if _int(size) and size > IMAGE:
        _set(cfg, "image_size", IMAGE)
    elif isinstance(size, (list, tuple)) and all(_int(s) for s in size):
        _set(cfg, "image_size", type(size)(min(s, IMAGE) for s in size))
    _fit_window(cfg)
    _fit_axial(cfg)
    _fit_mamba(cfg)
    _fit_frames(cfg)
    _fit_univnet(cfg)
    _fit_bros(cfg)
    _fit_query_tokens(cfg)
    _fit_align(cfg)
    _fit_cycles(cfg)
    _fit_hgnet(cfg)
    _fit_detr(cfg)
    _fit_hiera(cfg)
    _fit_codec_stages(cfg)
    layers = next(iter(old_layers), None)
    chosen = [i for i in kept if layers is None or i < layers] or list(range(LAYERS))
    shared = vars(cfg).get("num_kv_shared_layers")
    if _int(shared) and shared > 0 and layers is not None:
        # Gemma 3n: the last layers reuse the keys/values of the last earlier
        # layer of their kind; the kept layers of the shared part stay shared
        _set(cfg, "num_kv_shared_layers", sum(i >= layers - shared for i in chosen))
    for key, value in list(vars(cfg).items()):
        lowered = key.lower()
        if (
            "dropout" in lowered or "drop_path" in lowered or "layerdrop" in lowered
        ) and (isinstance(value, float)):
            _set(cfg, key, 0.0)  # an int 0 stays an int (strict dataclass configs)
        elif (
            lowered.endswith("_prob") and "drop" in lowered and isinstance(value, float)
        ):
            _set(cfg, key, 0.0)
        elif (
            isinstance(value, list)
            and old_layers
            and len(value) in old_layers
            and key not in ("architectures",)
        ):
            _set(cfg, key, [value[i] for i in chosen])  # per-layer: layer_types, ...
    vocab = getattr(cfg, "vocab_size", None)
    if _int(vocab):
        for key, value in list(vars(cfg).items()):
            if key.endswith("_token_id") and _int(value) and value >= vocab:
                _set(cfg, key, value % vocab)
    if hasattr(cfg, "use_cache"):
        _set(cfg, "use_cache", False)
    if hetero is not None:
        _put_back_per_layer(cfg, hetero, chosen if old_layers else None)
    return cfg


def _kept_layers(cfg: Any) -> list[int]:
    """Which of the layers to keep: the first LAYERS, but one of each kind where
    ``layer_types`` names more (at most 4 kinds)."""
    types = vars(cfg).get("layer_types")
    if not isinstance(types, list) or not types:
        return list(range(LAYERS))
    shared = vars(cfg).get("num_kv_shared_layers")
    if _int(shared) and 0 < shared < len(types):
        # layers that share another's keys/values (Gemma 3n): one of each kind
        # before the shared part and one of each kind in it
        start = len(types) - shared
        before = _first_of_each(types, range(start))
        return sorted(before + _first_of_each(types, range(start, len(types))))
    first: dict[Any, int] = {}
    for i, kind in enumerate(types):
        if isinstance(kind, str):
            first.setdefault(kind, i)
    picked = sorted(first.values())[:4]
    for i in range(len(types)):
        if len(picked) >= LAYERS:
            break
        if i not in picked:
            picked.append(i)
    return sorted(picked)


def _first_of_each(types: list[Any], span: range) -> list[int]:
    first: dict[Any, int] = {}
    for i in span:
        first.setdefault(types[i], i)
    return sorted(first.values())


def _put_back_per_layer(cfg: Any, hetero: Any, chosen: list[int] | None) -> None:
    overrides = getattr(hetero, "per_layer_overrides", None)
    if not isinstance(overrides, Mapping):
        cfg.__dict__["_heterogeneity_spec"] = hetero
        return
    if chosen is None:
        chosen = sorted(overrides)
    kept = {}
    for new, old in enumerate(chosen):
        layer = dict(overrides.get(old, {}))
        for key, value in list(layer.items()):
            current = vars(cfg).get(key)
            if _int(value) and _int(current) and value > current:
                layer[key] = current  # shrunk like the global value
        layer = {k: v for k, v in layer.items() if vars(cfg).get(k, object()) != v}
        if layer:
            kept[new] = layer
    if not kept:
        return
    from transformers.integrations.heterogeneity.configuration_utils import (
        _apply_heterogeneous_config,
    )

    _apply_heterogeneous_config(cfg, kept)


#: integer attributes capped by their name (after the named keys above): widths
#: to HIDDEN, inner widths to FFN, vocabularies (entity, hash, shape tables) to
#: VOCAB, group counts to 2, channel seeds that double per stage to 8
_WIDTH_WORDS = (
    "hidden",
    "embed",
    "proj",
    "d_model",
    "channels",
    "width",
    "lora_rank",
    "adapter",
)
_WIDTH_SUFFIXES = ("_dim", "_size", "_dims", "channels")
_INNER_WORDS = ("intermediate", "ffn", "inner", "mlp")
_NOT_WIDTH = (
    "position",
    "vocab",
    "token",
    "_id",
    "max_",
    "seq",
    "length",
    "window",
    "patch",
    "image",
    "sampling",
    "rate",
    "mel",
    "frame",
    "fft",
    "hop",
    "batch",
    "chunk",
    "stride",
    "kernel",
    "bins",
    "codebook",
    "bucket",
    "time",
    "step",
    "sample",
    "resolution",
    "num_",
    "layer",
    "label",
    "ratio",
    "period",
    "scale",
    "pool",
    "spatial",
    "temporal",
    "crop",
    "range",
    "context",
    "query",
    "queries",
)


#: an attribute that counts attention heads: num_heads, linear_num_heads,
#: num_key_heads, linear_num_value_heads, n_heads, ...
_HEAD_COUNT = re.compile(r"(^|_)(num|n)(_[a-z]+)*_heads$")


def _cap_by_name(cfg: Any) -> None:
    for key, value in list(vars(cfg).items()):
        if not _int(value) or key.startswith("_"):
            continue
        low = key.lower()
        if "vocab" in low and value > VOCAB:
            _set(cfg, key, VOCAB)
        elif low.endswith("groups") and value > 2:
            _set(cfg, key, 2)
        elif low in ("num_filters", "upsample_initial_channel") and value > 8:
            _set(cfg, key, 8)
        elif low.startswith(("index_n_heads", "index_num_heads")) and value > HEADS:
            _set(cfg, key, HEADS)
        elif _HEAD_COUNT.search(low) and value > HEADS:
            # other attention heads: a linear-attention mixer's (GLM-5-Next:
            # linear_num_heads 64 x 16 wide, a 3,072-channel conv per layer)
            _set(cfg, key, HEADS)
        elif low.endswith("lora_rank") and value > HIDDEN:
            _set(cfg, key, HIDDEN)  # MLA's q/kv compressions (1,536 and 512)
        elif low.endswith("head_dim") and low != "head_dim" and value > 16:
            _set(cfg, key, 16)  # qk_rope_head_dim, v_head_dim, index_head_dim
        elif any(w in low for w in _NOT_WIDTH):
            continue
        elif any(w in low for w in _INNER_WORDS) and value > FFN:
            if low.endswith(_WIDTH_SUFFIXES) or low.endswith(("_hidden", "dim")):
                _set(cfg, key, FFN)
        elif any(w in low for w in _WIDTH_WORDS) and value > HIDDEN:
            if low.endswith(_WIDTH_SUFFIXES) or low in ("d_model", "hidden_dim"):
                _set(cfg, key, HIDDEN)
    for key, value in list(vars(cfg).items()):
        # per-layer head counts (Sapiens2's key/value heads per layer)
        if isinstance(value, list) and "heads" in key.lower() and value:
            if all(_int(h) for h in value) and max(value) > HEADS:
                _set(cfg, key, [min(h, HEADS) for h in value])
    # depth_mult: RT-DETR / D-FINE's encoder blocks (round(3 x depth_mult) each)
    for key in (
        "width_coefficient",
        "depth_coefficient",
        "depth_multiplier",
        "depth_mult",
    ):
        value = vars(cfg).get(key)
        if isinstance(value, float) and value > 0.25:
            _set(cfg, key, 0.25)


_MAMBA_HEADS = ("mamba_n_heads", "mamba_num_heads", "n_mamba_heads")
_MAMBA_HEAD_DIM = ("mamba_d_head", "mamba_head_dim", "mamba_headdim")
_MAMBA_EXPAND = ("mamba_expand", "expand")
_MAMBA_STATE = ("mamba_d_state", "ssm_state_size", "state_size")


def _fit_mamba(cfg: Any) -> None:
    """Mamba-2 mixers (Bamba, Falcon-H1, Nemotron-H, Zamba2, Mamba2): heads x head
    size must equal expand x width (the inner size), and the state 16 wide."""
    v = vars(cfg)
    heads = next((k for k in _MAMBA_HEADS if _int(v.get(k))), None)
    size = next((k for k in _MAMBA_HEAD_DIM if _int(v.get(k))), None)
    if heads is None and "mamba" in type(cfg).__name__.lower():
        heads = "num_heads" if _int(v.get("num_heads")) else None
        size = "head_dim" if _int(v.get("head_dim")) else None
    expand = next((k for k in _MAMBA_EXPAND if _int(v.get(k))), None)
    hidden = v.get("hidden_size")
    if heads is None or size is None or expand is None or not _int(hidden):
        return
    inner = v[expand] * hidden
    if _int(v.get("mamba_d_ssm")):
        _set(cfg, "mamba_d_ssm", inner)
    n = min(HEADS, inner)
    _set(cfg, heads, n)
    _set(cfg, size, inner // n)
    for key in _MAMBA_STATE:
        if _int(v.get(key)) and v[key] > 16:
            _set(cfg, key, 16)


FRAMES = 4


def _fit_frames(cfg: Any) -> None:
    """Video models (VideoMAE: 16 frames, ViViT: 32): at most FRAMES frames, a
    multiple of the temporal tubelet (position tables follow the config)."""
    frames = vars(cfg).get("num_frames")
    if not _int(frames) or frames <= FRAMES:
        return
    tubelet = _first_int(vars(cfg).get("tubelet_size")) or 1
    _set(cfg, "num_frames", tubelet * max(1, FRAMES // tubelet))


def _fit_univnet(cfg: Any) -> None:
    """UnivNet: its kernel predictor's residual blocks are ``model_in_channels``
    wide on ``kernel_predictor_hidden_channels`` inputs (equal in the default,
    64): keep them equal (16); and the location-variable convolutions' kernels
    grow with the square of ``model_hidden_channels``: 8 wide, 0.3M parameters,
    not 14.6M at 32."""
    v = vars(cfg)
    if not all(
        _int(v.get(k))
        for k in (
            "model_in_channels",
            "kernel_predictor_hidden_channels",
            "model_hidden_channels",
        )
    ):
        return
    _set(cfg, "model_in_channels", 16)
    _set(cfg, "kernel_predictor_hidden_channels", 16)
    _set(cfg, "model_hidden_channels", 8)
    strides = v.get("resblock_stride_sizes")
    if isinstance(strides, list) and all(_int(s) for s in strides):
        # upsampling x2 per block, not x8, x8, x4: 8 samples a frame, not 256
        # (fd in float64 ran past 90 s on 2 x 16,384 samples)
        _set(cfg, "resblock_stride_sizes", [min(s, 2) for s in strides])


def _fit_bros(cfg: Any) -> None:
    """BROS derives its box-embedding widths from the width and heads when the
    config is made (not when they change): derive them again."""
    v = vars(cfg)
    if not all(_int(v.get(k)) for k in ("dim_bbox", "dim_bbox_projection")):
        return
    hidden, heads = v.get("hidden_size"), v.get("num_attention_heads")
    if _int(hidden) and _int(heads):
        # each of the 8 box coordinates needs a sine and a cosine: >= 2 wide
        per = max(hidden // 4 // v["dim_bbox"], 2)
        _set(cfg, "dim_bbox_sinusoid_emb_2d", per * v["dim_bbox"])
        _set(cfg, "dim_bbox_sinusoid_emb_1d", per)
        _set(cfg, "dim_bbox_projection", hidden // heads)


QUERY_TOKENS = 4


def _fit_query_tokens(cfg: Any) -> None:
    """BLIP-2 / InstructBLIP put their Q-Former's query outputs where the ids
    hold the image token: at most QUERY_TOKENS queries, and an image token id
    where the default config leaves it unset (real checkpoints set it; the
    inputs then hold one per query, see _with_required)."""
    queries = vars(cfg).get("num_query_tokens")
    if not _int(queries) or not hasattr(cfg, "get_text_config"):
        return
    if queries > QUERY_TOKENS:
        _set(cfg, "num_query_tokens", QUERY_TOKENS)
    vocab = getattr(cfg.get_text_config(), "vocab_size", None)
    if getattr(cfg, "image_token_id", 0) is None and _int(vocab) and vocab > 2:
        _set(cfg, "image_token_id", vocab - 1)


def _fit_align(cfg: Any) -> None:
    """ALIGN compares its text projection with the EfficientNet tower's last
    channels (no vision projection; equal in the default, 640): the projection
    follows the shrunk tower's width."""
    vis = vars(cfg).get("vision_config")
    if type(cfg).__name__ != "AlignConfig" or not _is_config(vis):
        return
    channels = getattr(vis, "out_channels", None)
    if isinstance(channels, (list, tuple)) and channels and _int(channels[-1]):
        from transformers.models.align.modeling_align import round_filters

        _set(cfg, "projection_dim", int(round_filters(vis, channels[-1])))


def _fit_mla(cfg: Any) -> None:
    """Multi-head latent attention (DeepSeek-V2/V3, Mistral 4, dots3): a query
    head is ``qk_nope_head_dim + qk_rope_head_dim`` wide (``qk_head_dim``), and
    where RoPE's width is ``partial_rotary_factor`` x ``head_dim`` it must be
    the rope part: the shrink caps the parts, so the factor follows them (left
    at the default's 64/256 it rotates 4 dims of a 16-wide rope part)."""
    v = vars(cfg)
    rope, nope = v.get("qk_rope_head_dim"), v.get("qk_nope_head_dim")
    if not (_int(rope) and _int(nope)):
        return
    if _int(v.get("qk_head_dim")):
        _set(cfg, "qk_head_dim", rope + nope)
    params, head = v.get("rope_parameters"), v.get("head_dim")
    if not isinstance(params, dict) or not _int(head) or rope > head:
        return
    nested = not ({"rope_theta", "rope_type"} & set(params))
    for sub in params.values() if nested else [params]:
        if isinstance(sub, dict) and "partial_rotary_factor" in sub:
            sub["partial_rotary_factor"] = rope / head


def _fit_cycles(cfg: Any) -> None:
    """HRM: a stack of ``num_layers_per_stack`` layers run ``H_cycles x
    (L_cycles + 1)`` times (``num_hidden_layers`` counts those slots), which the
    layer cap did not reach (16 layers x 8 passes: fd past 90 s). One layer a
    stack, 2 x (2 + 1) passes. And every inner cycle backpropagates
    (``L_bp_cycles``: the training-time k-step trick runs the earlier ones
    under no_grad, a deliberately truncated gradient that finite differences
    would call a mismatch; as dropout is off, the gradient checked is the
    model's exact one)."""
    v = vars(cfg)
    keys = ("H_cycles", "L_cycles", "num_layers_per_stack")
    if not all(_int(v.get(k)) for k in keys):
        return
    high, low = min(v["H_cycles"], 2), min(v["L_cycles"], 2)
    _set(cfg, "H_cycles", high)
    _set(cfg, "L_cycles", low)
    _set(cfg, "num_layers_per_stack", 1)
    _set(cfg, "num_hidden_layers", high * (low + 1))
    if isinstance(v.get("L_bp_cycles"), list):
        _set(cfg, "L_bp_cycles", [low] * high)


def _fit_hgnet(cfg: Any) -> None:
    """HGNetV2 (D-FINE's backbone): its stage widths are lists the width caps do
    not name (stem 32/48, stages up to 2,048 wide, 6 layers a block): every
    width / 8 (each stage's input is the last one's output: still equal), one
    block of 2 layers a stage, and ``hidden_sizes`` (which the backbone reports
    as its channels) the stages' outputs."""
    v = vars(cfg)
    keys = ("stage_in_channels", "stage_mid_channels", "stage_out_channels")
    if not all(isinstance(v.get(k), (list, tuple)) for k in keys):
        return

    def div(values: Any) -> list[int]:
        return [max(c // 8, 4) for c in values]

    for key in keys:
        _set(cfg, key, div(v[key]))
    stem = v.get("stem_channels")
    if isinstance(stem, (list, tuple)) and len(stem) > 1:
        _set(cfg, "stem_channels", [stem[0], *div(stem[1:])])
    for key, most in (("stage_num_blocks", 1), ("stage_numb_of_layers", 2)):
        if isinstance(v.get(key), (list, tuple)):
            _set(cfg, key, [min(n, most) for n in v[key]])
    _set(cfg, "hidden_sizes", list(v["stage_out_channels"]))


def _fit_detr(cfg: Any) -> None:
    """RT-DETR / D-FINE: the hybrid encoder takes the backbone's channels
    (``encoder_in_channels``) and the decoder the encoder's width
    (``decoder_in_channels``); both follow the shrunk backbone and encoder (read
    from the backbone built on the meta device)."""
    v = vars(cfg)
    enc, dec = v.get("encoder_in_channels"), v.get("decoder_in_channels")
    width, backbone = v.get("encoder_hidden_dim"), v.get("backbone_config")
    lists = (list, tuple)
    if not (isinstance(enc, lists) and isinstance(dec, lists) and _int(width)):
        return
    _set(cfg, "decoder_in_channels", [width] * len(dec))
    if not _is_config(backbone):
        return
    try:
        import torch
        from transformers import AutoBackbone

        with torch.device("meta"):
            channels = list(AutoBackbone.from_config(backbone).channels)
    except Exception:
        return
    if len(channels) == len(enc):
        _set(cfg, "encoder_in_channels", channels)


def _fit_hiera(cfg: Any) -> None:
    """SAM 2's Hiera backbone: per-stage block counts and widths (1, 2, 7, 2
    blocks; 96 to 768 wide: 27M parameters shrunk) that no width cap names:
    one block a stage, widths doubling from the shrunk ``hidden_size``; the
    vision config's FPN reads the backbone's channels (``backbone_channel_list``,
    deepest first): they follow."""
    v = vars(cfg)
    blocks, dims = v.get("blocks_per_stage"), v.get("embed_dim_per_stage")
    if isinstance(blocks, (list, tuple)) and isinstance(dims, (list, tuple)):
        width = v.get("hidden_size") if _int(v.get("hidden_size")) else dims[0]
        _set(cfg, "blocks_per_stage", [1] * len(blocks))
        _set(cfg, "embed_dim_per_stage", [width * 2**i for i in range(len(dims))])
    backbone = v.get("backbone_config")
    channels = v.get("backbone_channel_list")
    if _is_config(backbone) and isinstance(channels, (list, tuple)):
        dims = getattr(backbone, "embed_dim_per_stage", None)
        if isinstance(dims, (list, tuple)) and len(dims) == len(channels):
            _set(cfg, "backbone_channel_list", list(reversed(dims)))
        # the FPN levels' sizes, stride 4 first then halving: at the shrunk image
        sizes = v.get("backbone_feature_sizes")
        image = _first_int(getattr(backbone, "image_size", None))
        stride = _first_int(getattr(backbone, "patch_stride", None))
        if isinstance(sizes, (list, tuple)) and image and stride:
            base = image // stride
            _set(
                cfg,
                "backbone_feature_sizes",
                [[max(base >> i, 1)] * 2 for i in range(len(sizes))],
            )


def _fit_codec_stages(cfg: Any) -> None:
    """A convolutional audio codec whose channels double per downsampling stage
    from ``num_filters`` (VibeVoice's acoustic tokenizer: 6 stages, 8 x 2**6 =
    512 wide with kernels of 16 even shrunk, 10.9M parameters): 3 stages of x2
    (``depths`` has one more entry, the bottleneck's), one block each."""
    v = vars(cfg)
    ratios, depths = v.get("downsampling_ratios"), v.get("depths")
    if not (
        _int(v.get("num_filters"))
        and isinstance(ratios, (list, tuple))
        and isinstance(depths, (list, tuple))
        and len(depths) == len(ratios) + 1
        and len(ratios) > 3
    ):
        return
    _set(cfg, "downsampling_ratios", [2, 2, 2])
    _set(cfg, "depths", [1, 1, 1, 1])


def _fit_axial(cfg: Any) -> None:
    """Reformer: the axial position embedding's parts must add up to the width."""
    dims, hidden = vars(cfg).get("axial_pos_embds_dim"), vars(cfg).get("hidden_size")
    if isinstance(dims, (list, tuple)) and len(dims) == 2 and _int(hidden):
        if sum(dims) != hidden:
            _set(cfg, "axial_pos_embds_dim", type(dims)((hidden // 2, hidden // 2)))


def _fit_window(cfg: Any) -> None:
    """Swin-style models: the attention window must fit the last stage's
    resolution at the shrunk image size (64 / patch 4 / 2**3 = 2, not 7)."""
    window, depths = getattr(cfg, "window_size", None), getattr(cfg, "depths", None)
    size, patch = getattr(cfg, "image_size", None), getattr(cfg, "patch_size", None)
    if not (
        _int(window)
        and _int(size)
        and _int(patch)
        and isinstance(depths, (list, tuple))
    ):
        return
    last = size // patch // 2 ** max(len(depths) - 1, 0)
    if 1 <= last < window:
        _set(cfg, "window_size", last)


_STAGE_WIDTH_KEYS = ("conv_dim", "hidden_sizes", "embed_dims", "dims", "embed_dim")
_STAGE_DEPTH_KEYS = ("depths",)


def cap_list(cfg: Any, keys: tuple[str, ...], limit: int) -> None:
    """Cap every entry of per-stage integer lists at ``limit``."""
    for key in keys:
        value = getattr(cfg, key, None)
        if isinstance(value, (list, tuple)) and value and all(_int(v) for v in value):
            _set(cfg, key, type(value)(min(v, limit) for v in value))


def _set(cfg: Any, key: str, value: Any) -> None:
    try:
        setattr(cfg, key, value)
    except (AttributeError, TypeError, ValueError, NotImplementedError):
        pass  # a read-only property: the model derives it


def apply_overrides(cfg: Any, overrides: Mapping[str, str], spec: str) -> None:
    """Set ``key=value`` pairs (``text_config.hidden_size`` for nested configs),
    each parsed as the type the config's attribute has. InvalidArgumentError names
    a key the config does not have (with the valid ones) or a value of the wrong
    type."""
    for key, text in overrides.items():
        target, parts = cfg, key.split(".")
        for part in parts[:-1]:
            nested = getattr(target, part, None)
            if not _is_config(nested):
                raise InvalidArgumentError(
                    f"{spec}: override {key!r}: {part!r} is not a nested config of "
                    f"{type(target).__name__}; nested configs: {_nested(target)}."
                )
            target = nested
        name = parts[-1]
        valid = sorted(k for k in target.to_dict() if not k.startswith("_"))
        if name.startswith("_") or name not in valid:
            raise InvalidArgumentError(
                f"{spec}: unknown override {key!r}: {type(target).__name__} has no "
                f"attribute {name!r}. Valid keys: {', '.join(valid)}."
            )
        current = getattr(target, name)
        setattr(target, name, _parse_value(text, current, key, spec))


def _nested(cfg: Any) -> list[str]:
    return sorted(k for k, v in vars(cfg).items() if _is_config(v)) or ["none"]


def _parse_value(text: str, current: Any, key: str, spec: str) -> Any:
    def bad(kind: str) -> InvalidArgumentError:
        return InvalidArgumentError(
            f"{spec}: override {key}={text!r} is not {kind} (the config's {key} is "
            f"{current!r}, a {type(current).__name__}); write e.g. {key}={_example(current)}."
        )

    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise bad("a boolean (true/false)")
    if _int(current):
        try:
            return int(text)
        except ValueError:
            raise bad("an integer") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise bad("a number") from None
    if isinstance(current, str):
        return text
    try:  # None, lists, dicts: a JSON literal, else the string itself
        value = json.loads(text)
    except ValueError:
        if isinstance(current, (list, tuple, dict)):
            raise bad(f"a JSON {type(current).__name__}") from None
        return text
    if isinstance(current, (list, tuple, dict)) and not isinstance(value, (list, dict)):
        raise bad(f"a JSON {type(current).__name__}")
    return value


def _example(current: Any) -> str:
    if isinstance(current, bool):
        return "true"
    if _int(current):
        return "2"
    if isinstance(current, float):
        return "0.5"
    if isinstance(current, (list, tuple)):
        return "[1,2]"
    return "text"


def count_parameters_meta(cfg: Any) -> int | None:
    """Parameters of ``AutoModel.from_config(cfg)`` built on the meta device (no
    memory); None when that does not work for this model."""
    try:
        return _meta_count(cfg)
    except Exception:
        return None


def _meta_count(cfg: Any) -> int:
    import torch
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def _unbuildable(text: str) -> Exception:
    from gradcheck.models import UnbuildableError

    return UnbuildableError(text)


def _why(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first}"


def _has_experts(cfg: Any, _depth: int = 0) -> bool:
    """Whether cfg (or a config nested in it) has routed experts."""
    if any(_int(getattr(cfg, k, None)) for k in _EXPERT_KEYS):
        return True
    return _depth < 3 and any(
        _has_experts(v, _depth + 1) for v in vars(cfg).values() if _is_config(v)
    )


def build_model(cfg: Any, eager: bool = True) -> Any:
    """``AutoModel.from_config`` with eager attention (``eager=False``: the
    model's default attention, SDPA)."""
    from transformers import AutoModel

    # mixture of experts: transformers' per-expert loop ("eager"), not its default
    # grouped_mm, whose CPU kernel refuses float64 (float64 checks and references)
    moe = {"experts_implementation": "eager"} if _has_experts(cfg) else {}
    if not eager:  # a copy: the config remembers the attention it was built with
        return AutoModel.from_config(
            copy.deepcopy(cfg), attn_implementation="sdpa", **moe
        )
    try:
        return AutoModel.from_config(cfg, attn_implementation="eager", **moe)
    except (ValueError, TypeError) as exc:
        if "attn_implementation" not in str(exc) and "eager" not in str(exc):
            raise
        return AutoModel.from_config(cfg, **moe)


def _sub(cfg: Any, *names: str) -> Any:
    for name in names:
        sub = getattr(cfg, name, None)
        if _is_config(sub):
            return sub
    return cfg


def _ids(torch: Any, gen: Any, cfg: Any, batch: int, seq: int) -> Any:
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    vocab = getattr(text, "vocab_size", None) or getattr(cfg, "vocab_size", None)
    if not _int(vocab) or vocab < 2:
        raise ValueError(f"cannot draw token ids: vocab_size is {vocab!r}")
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    pad = getattr(text, "pad_token_id", None)
    if _int(pad) and 0 <= pad < vocab:  # token ids that avoid the padding id
        ids[ids == pad] = (pad + 1) % vocab
    return ids


def infer_inputs(model: Any, seed: int, extra: bool = False) -> dict[str, Any]:
    """Inputs for ``model.forward`` from its main input name and signature:
    token ids avoiding the padding id, an all-ones attention mask, decoder ids for
    encoder-decoders, pixel values, audio values or features. ``extra``: also fill
    every other known input the signature takes (multimodal models)."""
    import torch

    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    sig = inspect.signature(model.forward).parameters
    main = getattr(model, "main_input_name", "input_ids")
    if main not in INPUT_KINDS:
        found = [k for k in INPUT_KINDS if k in sig]
        if not found:
            raise ValueError(
                f"{type(model).__name__} takes {main!r}, not token ids, pixel values "
                "or audio values; pass inputs= yourself"
            )
        main = found[0]
    wanted = [main] + (
        [k for k in INPUT_KINDS if k in sig and k != main] if extra else []
    )
    batch, seq = 2, 8
    inputs: dict[str, Any] = {}
    for name in wanted:
        if name == TEXT:
            inputs[name] = _ids(torch, gen, cfg, batch, seq)
        elif name == IMAGE_INPUT:
            vis = _sub(cfg, "vision_config", "backbone_config")
            channels = getattr(vis, "num_channels", None) or 3
            size = getattr(vis, "image_size", None) or IMAGE
            h, w = (size, size) if _int(size) else tuple(size)[:2]
            inputs[name] = torch.randn(batch, channels, h, w, generator=gen)
        elif name == "input_values":
            inputs[name] = torch.randn(batch, _samples(cfg), generator=gen)
        elif name == "input_features":
            aud = _sub(cfg, "audio_config", "encoder_config")
            mels = (
                getattr(aud, "num_mel_bins", None)
                or getattr(aud, "feature_size", None)
                or getattr(aud, "input_feat_per_channel", None)
                or 80
            )
            frames = getattr(aud, "max_source_positions", None)
            frames = 2 * frames if _int(frames) else 64
            if "noise_sequence" in sig:  # a vocoder: every frame is hundreds of
                frames = 16  # samples out (UnivNet's fd took 40 s on 64)
            inputs[name] = torch.randn(batch, mels, frames, generator=gen)
    queries, image = (
        getattr(cfg, "num_query_tokens", None),
        getattr(cfg, "image_token_id", None),
    )
    if TEXT in inputs and IMAGE_INPUT in inputs and _int(queries) and _int(image):
        # BLIP-2: one image token per query in front of the text, none in it
        text = torch.where(inputs[TEXT] == image, image - 1, inputs[TEXT])
        marks = torch.full((batch, queries), image, dtype=text.dtype)
        inputs[TEXT] = torch.cat([marks, text], dim=1)
        seq = inputs[TEXT].shape[1]
    if "attention_mask" in sig and TEXT in inputs:
        inputs["attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
    if getattr(cfg, "is_encoder_decoder", False) and "decoder_input_ids" in sig:
        inputs["decoder_input_ids"] = _ids(torch, gen, cfg, batch, seq)
    draw = sig.get("sample")
    if draw is not None and draw.default is True:
        # a VAE that draws its latent in forward by default (VibeVoice's
        # acoustic tokenizer: mean + vae_std x noise): its mean, a function
        inputs["sample"] = False
    if "noise_sequence" in sig and "input_features" in inputs:
        # a vocoder (UnivNet) draws its noise inside forward when none is given:
        # a different function at every call. Given, the forward is deterministic
        inputs["noise_sequence"] = _noise(torch, gen, cfg, inputs["input_features"])
    return inputs


def _noise(torch: Any, gen: Any, cfg: Any, feats: Any) -> Any:
    """UnivNet's noise: (batch, frames, model_in_channels), frames as the
    features' (batch, frames, mel bins) layout has them."""
    width = getattr(cfg, "model_in_channels", None) or 64
    return torch.randn(feats.shape[0], feats.shape[1], width, generator=gen)


def _samples(cfg: Any) -> int:
    """Audio samples for ``input_values``: 4000, rounded up to a multiple of the
    samples one output token takes where the config names it (Muse Spark: 1920)."""
    per = getattr(
        _sub(cfg, "audio_config", "encoder_config"), "samples_per_token", None
    )
    if _int(per) and per > 1:
        return -(-4000 // per) * per
    return 4000


def build(
    model_type: str,
    overrides: Mapping[str, str],
    spec: str,
    seed: int,
    max_parameters: int,
) -> tuple[Any, dict[str, Any], int]:
    """(model in eval mode, inputs, parameter count). InvalidArgumentError for a bad
    override; any other exception means the model cannot be built (its reason)."""
    import torch
    import transformers

    cfg = load_config(model_type)
    shrink_config(cfg)
    apply_overrides(cfg, overrides, spec)
    counted: int | None = None
    shrunk_failure: Exception | None = None
    try:  # parameters counted on the meta device, before any memory is taken
        counted = _meta_count(cfg)
    except Exception:
        # one layer of each kind may be one the default config cannot build
        # (an indexer without its budget): the first layers, as the default has
        cfg = shrink_config(load_config(model_type), each_kind=False)
        apply_overrides(cfg, overrides, spec)
        try:
            counted = _meta_count(cfg)
        except Exception as exc:
            try:
                _meta_count(load_config(model_type))
            except Exception as default_exc:
                raise _unbuildable(
                    f"transformers {transformers.__version__} cannot build "
                    f"{model_type} from its default config either (not gradcheck's "
                    f"shrink): {_why(default_exc)}"
                ) from default_exc
            shrunk_failure = exc
    if counted is not None and counted > max_parameters:
        raise _unbuildable(_too_big(spec, counted, max_parameters))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = build_model(cfg)
        except Exception as exc:
            if shrunk_failure is None:
                raise
            raise _unbuildable(
                f"{_why(exc)} (the shrunk config does not build; transformers' "
                "default config does: the shrink misses an attribute this model "
                "needs consistent; set it with an override)"
            ) from exc
        _draw_zero_tensors(model)
    model.eval()
    n = sum(p.numel() for p in model.parameters())
    if n > max_parameters:
        raise _unbuildable(_too_big(spec, n, max_parameters))
    try:
        inputs = _working_inputs(model, seed)
    except AttributeError as exc:
        known = _missing_config_attribute(exc, model_type)
        if known is None:
            raise
        raise known from exc
    except RuntimeError as exc:
        # multimodal RoPE (Qwen2-VL, GLM-4V): the modeling code's default
        # mrope_section ([16, 24, 24]) is for 128-wide heads; fit it to the
        # shrunk head, as the error says, and build again
        if not _fit_mrope(cfg, str(exc)):
            raise
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(cfg)
            _draw_zero_tensors(model)
        model.eval()
        inputs = _working_inputs(model, seed)
    if not _finite_output(model, inputs):
        model = _default_attention(cfg, seed, inputs) or model
    _calibrate_batch_norm(model, inputs)
    return model, inputs, n


_NO_ATTRIBUTE = re.compile(r"'(\w+Config)' object has no attribute '(\w+)'")


def _missing_config_attribute(exc: Exception, model_type: str) -> Exception | None:
    """The model's forward reads a config attribute its config class does not
    define, default config included (qwen2_5_omni_thinker's RoPE index reads
    ``vision_start_token_id``, which only the talker's config has): a
    transformers bug, said as such; None when the default config has it (then
    the shrink lost it)."""
    import transformers

    m = _NO_ATTRIBUTE.search(str(exc))
    if m is None or hasattr(load_config(model_type), m.group(2)):
        return None
    return _unbuildable(
        f"transformers {transformers.__version__} cannot run {model_type} from "
        f"its default config either (not gradcheck's shrink): its forward reads "
        f"config.{m.group(2)}, which {m.group(1)} does not define "
        f"({_why(exc)})"
    )


def _finite_output(model: Any, inputs: dict[str, Any]) -> bool:
    """Whether the model's first floating output is finite on ``inputs``."""
    import torch

    with torch.no_grad():
        out = model(**inputs)
    values = out.values() if isinstance(out, Mapping) else out
    values = [values] if torch.is_tensor(values) else list(values)
    for v in values:
        if torch.is_tensor(v) and v.is_floating_point():
            return bool(torch.isfinite(v).all())
    return True


def _default_attention(cfg: Any, seed: int, inputs: dict[str, Any]) -> Any:
    """The model built again with its default attention when that one's output
    is finite where eager attention's is not, else None. NeMo's streaming
    Conformer (nemotron3_5_asr, nemotron_asr_streaming) masks with
    ``attention_mask.logical_not()``, right for the boolean mask SDPA gets and
    wrong for eager's additive float mask (0 where allowed): every score is
    -inf, softmax 0/0, the output NaN at any weights. A model NaN with both
    stays as built: its check reports the NaN."""
    import torch

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(cfg, eager=False)
            _draw_zero_tensors(model)
        model.eval()
        if model.config._attn_implementation == "eager":
            return None
        return model if _finite_output(model, inputs) else None
    except Exception:
        return None


def _draw_zero_tensors(model: Any) -> list[str]:
    """Parameters of two or more dimensions that the initialisation leaves all
    zero (BLIP-2's query tokens, zero-initialised embeddings and up
    projections) drawn like the config's other weights (normal, std
    ``initializer_range``, from the build's seed). A checkpoint never holds
    them at zero, and at zero the model sits on a degenerate point: BLIP-2's
    identical query tokens are a LayerNorm input of zero variance, whose
    derivative (1/sqrt(eps) = 1e6) no finite difference resolves. Biases and
    other 1-D parameters (zero-initialised gates and shifts) stay as they are.
    Returns the names drawn."""
    import torch

    std = getattr(model.config, "initializer_range", None)
    std = std if isinstance(std, float) and 0 < std < 1 else 0.02
    drawn = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and p.is_floating_point() and not p.any():
                p.normal_(0.0, std)
                drawn.append(name)
    return drawn


def _calibrate_batch_norm(model: Any, inputs: dict[str, Any]) -> None:
    """Batch norms' running statistics set to the inputs' (one forward in train
    mode, cumulative average; then eval again), as training leaves them. At
    their initial statistics (mean 0, variance 1) a narrow shrunk convnet's
    signal fades by ~1e-4 per block (ALIGN's EfficientNet: 1e-27 after seven
    blocks, 0 in float32, so normalising it is 0/0). Nothing else changes;
    a model whose train-mode forward fails keeps the initial statistics."""
    import torch

    norms = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        and m.track_running_stats
    ]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    saved = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # the cumulative average of this one batch
        model.train()
        # a train-mode forward may draw (router jitter, noise): not from the
        # caller's generator
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(**inputs)
    except Exception:
        for m, (mean, var) in zip(norms, saved, strict=True):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()


_MROPE = re.compile(
    r"split_sizes to sum exactly to (\d+) .*got split_sizes=\[([\d, ]+)\]"
)


def _fit_mrope(cfg: Any, message: str) -> bool:
    """Set ``rope_parameters["mrope_section"]`` on every (nested) config that has
    rope parameters: the sections the error names, scaled to sum to its total."""
    m = _MROPE.search(message)
    if m is None:
        return False
    total = int(m.group(1))
    old = [int(x) for x in m.group(2).split(",")]
    if not old or total < len(old):
        return False
    new = [max(1, round(x * total / sum(old))) for x in old]
    new[-1] = total - sum(new[:-1])
    if new[-1] < 1:
        return False
    done = False
    for sub in _configs(cfg):
        rope = vars(sub).get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope:
            rope["mrope_section"] = new
            done = True
    return done


def _configs(cfg: Any, seen: set[int] | None = None) -> list[Any]:
    seen = seen if seen is not None else set()
    if id(cfg) in seen:
        return []
    seen.add(id(cfg))
    out = [cfg]
    for value in vars(cfg).values():
        if _is_config(value):
            out += _configs(value, seen)
    return out


def _candidates(model: Any, seed: int) -> list[dict[str, Any]]:
    """The inputs to try, in order: the main input; every input kind the forward
    takes (multimodal); audio features as (batch, frames, features) too
    (Speech2Text) besides Whisper's (batch, features, frames); audio values as
    (batch, 1, samples) too (codecs: EnCodec, DAC, VibeVoice's tokenizer); pixel
    values as (batch, frames, channels, height, width) too (video: VideoMAE,
    ViViT; image sets: IDEFICS); then each of these with the other inputs the
    forward names that a model may require (boxes, language ids, a features
    mask). A vision tower that takes flattened patches with their grid
    (``grid_thw``: Qwen2-VL's and its kin) gets patches instead."""
    sig = inspect.signature(model.forward).parameters
    if any(k in sig for k in _GRID_KEYS) and TEXT not in sig:  # a vision tower
        return _patch_candidates(model, seed, sig)
    first = infer_inputs(model, seed)
    out = [first]
    more = infer_inputs(model, seed, extra=True)
    if set(more) != set(first):
        out.append(more)
    frames = getattr(_sub(model.config, "vision_config"), "num_frames", None)
    frames = frames if _int(frames) and frames > 0 else 1
    for cand in list(out):
        feats = cand.get("input_features")
        if feats is not None and feats.dim() == 3:
            flipped = feats.transpose(1, 2).contiguous()
            alt = {**cand, "input_features": flipped}
            if "noise_sequence" in cand:  # its frames follow the layout
                gen = _gen(seed)
                alt["noise_sequence"] = _noise(_torch(), gen, model.config, flipped)
            out.append(alt)
        values = cand.get("input_values")
        if values is not None and values.dim() == 2:  # codecs: (batch, 1, samples)
            out.append({**cand, "input_values": values.unsqueeze(1)})
        pixels = cand.get("pixel_values")
        if pixels is not None and pixels.dim() == 4:  # video / a set of images
            b, c, h, w = pixels.shape
            video = _torch().randn(b, frames, c, h, w, generator=_gen(seed))
            out.append({**cand, "pixel_values": video})
    extended = [_with_required(c, sig, model.config, seed) for c in out]
    changed = [
        c
        for c, old in zip(extended, out, strict=True)
        if c.keys() != old.keys() or any(c[k] is not old[k] for k in c)
    ]
    return out + changed


#: the names a vision tower's patch grid goes by (Qwen2-VL, GLM-4V, Kimi, ...)
_GRID_KEYS = ("grid_thw", "image_grid_thw")


def _torch() -> Any:
    import torch

    return torch


def _gen(seed: int) -> Any:
    return _torch().Generator().manual_seed(seed)


def _with_required(
    cand: dict[str, Any], sig: Mapping[str, Any], cfg: Any, seed: int
) -> dict[str, Any]:
    """``cand`` plus the other inputs the forward names that some models
    require, drawn to be valid: ``bbox`` (LayoutLM, BROS: boxes x0 <= x1,
    y0 <= y1 on a 0..1000 page), ``lang_ids`` (X-MOD: the first language's
    adapter), ``input_features_mask`` (AudioFlamingo3: every frame valid).
    Only tried after the plain candidates, so a model that runs without them
    keeps the inputs it had."""
    torch = _torch()
    gen = _gen(seed + 1)
    out = dict(cand)
    ids = cand.get(TEXT)
    if "bbox" in sig and "bbox" not in cand and ids is not None:
        corners = torch.randint(0, 1001, (*ids.shape, 2, 2), generator=gen)
        low, high = corners.min(dim=-2).values, corners.max(dim=-2).values
        out["bbox"] = torch.cat([low, high], dim=-1)  # x0, y0, x1, y1
    if "lang_ids" in sig and "lang_ids" not in cand and ids is not None:
        out["lang_ids"] = torch.zeros(ids.shape[0], dtype=torch.long)
    pixels = cand.get("pixel_values")
    if "qformer_input_ids" in sig and "qformer_input_ids" not in cand:
        if ids is not None:  # InstructBLIP's instruction
            qformer = _sub(cfg, "qformer_config")
            out["qformer_input_ids"] = _ids(torch, gen, qformer, ids.shape[0], 8)
    if "image_attention_mask" in sig and ids is not None and pixels is not None:
        images = pixels.shape[1] if pixels.dim() == 5 else 1  # IDEFICS: every
        # token sees every image
        out["image_attention_mask"] = torch.ones(*ids.shape, images, dtype=torch.long)
    feats = cand.get("input_features")
    if "input_features_mask" in sig and feats is not None and feats.dim() == 3:
        aud = _sub(cfg, "audio_config", "encoder_config")
        mels = getattr(aud, "num_mel_bins", None) or getattr(aud, "feature_size", None)
        frames = feats.shape[2] if feats.shape[1] == mels else feats.shape[1]
        out["input_features_mask"] = torch.ones(
            feats.shape[0], frames, dtype=torch.long
        )
    return out


def _patch_candidates(
    model: Any, seed: int, sig: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """A vision tower fed flattened patches and their grid: 2 images of
    (1, 2m, 2m) patches (m: the spatial merge size, so merging fits), the
    patches in each layout these towers read: (patches, channels x temporal
    patch x patch x patch) as Qwen2-VL's processor makes them, (patches,
    channels, patch, patch) (Kimi-K2.5), (patches x patch x patch, channels)
    (Inkling-2)."""
    torch = _torch()
    cfg = model.config
    size = _first_int(getattr(cfg, "patch_size", None)) or 14
    temporal = _first_int(getattr(cfg, "temporal_patch_size", None)) or 1
    merge = _first_int(getattr(cfg, "spatial_merge_size", None)) or _first_int(
        getattr(cfg, "merge_kernel_size", None)
    )
    merge = merge or 1
    channels = next(
        (
            v
            for v in (getattr(cfg, k, None) for k in ("in_channels", "num_channels"))
            if _int(v)
        ),
        3,
    )
    images, side = 2, 2 * merge
    grid = torch.tensor([[1, side, side]] * images, dtype=torch.long)
    n = images * side * side
    name = "pixel_values" if "pixel_values" in sig else "hidden_states"
    key = next(k for k in _GRID_KEYS if k in sig)
    gen = _gen(seed)
    flat = torch.randn(n, channels * temporal * size * size, generator=gen)
    layouts = [flat, flat.reshape(n, channels * temporal, size, size)]
    if temporal == 1:
        layouts.append(
            flat.reshape(n, channels, size * size).transpose(1, 2).reshape(-1, channels)
        )
    out = [{name: x.contiguous(), key: grid} for x in layouts]
    if merge > 1:  # Inkling-2: one (patch x m, patch x m, channels) per token,
        # the grid counted in merged tokens
        tokens = torch.tensor([[1, side // merge, side // merge]] * images)
        merged = torch.randn(
            n // merge**2, size * merge, size * merge, channels, generator=gen
        )
        out.append({name: merged, key: tokens})
    return out


def _first_int(value: Any) -> int | None:
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    return value if _int(value) else None


def _working_inputs(model: Any, seed: int) -> dict[str, Any]:
    import torch

    failures: list[Exception] = []
    tried = _candidates(model, seed)
    for cand in tried:
        for attempt in (cand, None):
            if attempt is None:  # once: the input the error asks for
                attempt = _repaired(cand, failures[-1])
                if attempt is None:
                    break
            try:
                with torch.no_grad():
                    model(**attempt)
            except Exception as exc:
                failures.append(exc)
                continue
            return attempt
    # the reason to give: the first that is not about an input left out (the
    # candidate with every input kind got further)
    raise next((e for e in failures if not _missing_input(e)), failures[0])


_MATMUL = re.compile(
    r"mat1 and mat2 shapes cannot be multiplied \((\d+)x(\d+) and (\d+)x(\d+)\)"
)
_MULTIPLE = re.compile(r"not a multiple of (\d+)")


def _repaired(cand: dict[str, Any], exc: Exception) -> dict[str, Any] | None:
    """``cand`` changed as the model's own error asks, or None: audio values
    whose length must be a multiple of N (rounded up to one); audio features
    whose feature width the first projection refuses (Granite Speech 5 stacks
    delta features: 4 x the mel bins), given the width it takes."""
    text = str(exc)
    values = cand.get("input_values")
    m = _MULTIPLE.search(text)
    if m and values is not None and 1 < int(m.group(1)) <= 100_000:
        per = int(m.group(1))
        n = -(-values.shape[-1] // per) * per
        shape = (*values.shape[:-1], n)
        return {**cand, "input_values": _torch().randn(shape, generator=_gen(0))}
    feats = cand.get("input_features")
    m = _MATMUL.search(text)
    if m and feats is not None and feats.dim() == 3:
        got, want = int(m.group(2)), int(m.group(3))
        if got == feats.shape[-1] and got != want and want <= 4096:
            shape = (*feats.shape[:-1], want)
            return {**cand, "input_features": _torch().randn(shape, generator=_gen(0))}
    return None


def _missing_input(exc: Exception) -> bool:
    text = str(exc)
    return (
        "required positional argument" in text
        or "You have to specify" in text
        or "You must specify" in text
    )


def _too_big(spec: str, n: int, limit: int) -> str:
    return (
        f"{spec} has {n:,} parameters after shrinking, over the limit of {limit:,}: "
        "checking it could exhaust memory. Shrink it further with overrides "
        "(e.g. ?vocab_size=512&num_hidden_layers=1) or raise max_parameters."
    )


def expand_all() -> list[str]:
    """Every model type in transformers' CONFIG_MAPPING that AutoModel knows and
    whose model takes token ids, pixel values or audio values as its main input
    (the model class's ``main_input_name``; a class without one: its forward
    signature). Not models whose main input is another kind (time series, video,
    latents) that merely accept one of these too. Nothing is built."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    found = []
    for model_type in CONFIG_MAPPING_NAMES:
        names = MODEL_MAPPING_NAMES.get(model_type)
        if not names:
            continue
        name = names[0] if isinstance(names, (list, tuple)) else names
        try:
            cls = getattr(transformers, name)
            main = getattr(cls, "main_input_name", None)
            sig = inspect.signature(cls.forward).parameters
        except Exception:  # an optional dependency is missing: not buildable here
            continue
        if main in INPUT_KINDS or (main is None and any(k in sig for k in INPUT_KINDS)):
            found.append(model_type)  # not models whose main input is another kind
    return found
