"""transformers configs for ``hf:<model_type>``: the shrink (layers, width, heads,
vocabulary, images, experts, dropout, nested configs), spec overrides and a
parameter count on the meta device. Imports transformers and torch only when
called; :mod:`gradcheck.backends._hf` builds the model and its inputs."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from gradcheck.errors import InvalidArgumentError

#: the shrink: every config (nested text/vision/audio configs too) gets at most
LAYERS = 2
HIDDEN = 32
HEADS = 2
FFN = 64
VOCAB = 1024
IMAGE = 64
EXPERTS = 4
SOURCE_POSITIONS = 32
#: the token count of drawn token ids (batch 2 x TOKENS)
TOKENS = 8
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
_EXPERT_KEYS = (
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "moe_num_experts",
)
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
    old_head = _head_size(cfg)  # before the caps: partial rotary keeps its share
    wide = _wide_attention(cfg)  # likewise a width multiple (Zamba2)
    derived = _derived_widths(cfg)  # before the nested configs shrink
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
    grouped = _grouped_query(cfg)  # before the caps make kv heads = heads
    cap(_HEAD_KEYS, HEADS)
    cap(_KV_KEYS, HEADS)
    if grouped:
        _fit_grouped_query(cfg)
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
    if wide:
        _fit_wide_attention(cfg, wide)
    _fit_rotary(cfg, old_head)
    _fit_mrope_section(cfg)
    _fit_expert_groups(cfg)
    size = getattr(cfg, "image_size", None)
    if _int(size) and size > IMAGE:
        _set(cfg, "image_size", IMAGE)
    elif isinstance(size, (list, tuple)) and all(_int(s) for s in size):
        _set(cfg, "image_size", type(size)(min(s, IMAGE) for s in size))
    _fit_window(cfg)
    _fit_patch_grid(cfg)
    _fit_axial(cfg)
    _fit_mamba(cfg)
    _fit_frames(cfg)
    _fit_univnet(cfg)
    _fit_bros(cfg)
    _fit_query_tokens(cfg)
    _fit_align(cfg)
    _fit_efficientnet(cfg)
    _fit_cycles(cfg)
    _fit_hgnet(cfg)
    _fit_detr(cfg)
    _fit_hiera(cfg)
    _fit_fpn_scales(cfg)
    _fit_codec_stages(cfg)
    _fit_doubling_encoder(cfg)
    _fit_upsampler(cfg)
    _fit_bridgetower(cfg)
    _fit_sampling(cfg)
    _fit_layout(cfg)
    _fit_blt(cfg)
    _fit_staged_audio(cfg)
    _fit_backbone_outputs(cfg, old_layers)
    _fit_lw_detr(cfg)
    _fit_efficientloftr(cfg)
    _fit_lightglue(cfg)
    _fit_clvp(cfg)
    _fit_uvdoc(cfg)
    _fit_swa_heads(cfg)
    _fit_indexer_heads(cfg)
    _fit_inkling_scales(cfg)
    _fit_depth_pro(cfg)
    _fit_unset_window(cfg)
    _fit_visual_prompt(cfg)
    for key, parts in derived.items():
        _set(cfg, key, sum(_width_of(cfg, p) or 0 for p in parts))
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
            (
                isinstance(value, list)
                or (isinstance(value, tuple) and all(isinstance(x, str) for x in value))
            )
            and old_layers
            and len(value) in old_layers
            and key not in ("architectures",)
            and key not in _LAYER_INDEX_SETS  # indexes, renumbered below
        ):
            # per-layer: layer_types, ...; a tuple of layer kinds too (Reformer's
            # attn_layers), not a tuple of numbers (CLAP's per-stage depths and
            # heads: 4 stages, as many as its num_hidden_layers, all kept)
            _set(cfg, key, type(value)(value[i] for i in chosen))
    if old_layers:
        _remap_layer_refs(cfg, chosen)
        _remap_layer_sets(cfg, chosen)
        _keep_a_moe_layer(cfg, len(chosen))
    vocab = getattr(cfg, "vocab_size", None)
    if _int(vocab):
        for key, value in list(vars(cfg).items()):
            if key.endswith("_token_id") and _int(value) and value >= vocab:
                _set(cfg, key, value % vocab)
    if hasattr(cfg, "use_cache"):
        _set(cfg, "use_cache", False)
    _fit_mirrored_dicts(cfg)
    if hetero is not None:
        _put_back_per_layer(cfg, hetero, chosen if old_layers else None)
    return cfg


def _fit_mirrored_dicts(cfg: Any) -> None:
    """FastSpeech2-Conformer's modules read plain-dict ``encoder_config`` /
    ``decoder_config`` that its config copies from ``encoder_layers``,
    ``encoder_linear_units``, ... when it is made: the shrunk (and
    dropout-free) values copied again (left alone: 4 layers of 1,536-wide
    feed-forwards, 4.8M parameters, whatever the caps said)."""
    v = vars(cfg)
    for key, value in list(v.items()):
        if not (key.endswith("_config") and isinstance(value, dict) and value):
            continue
        prefix = key[: -len("_config")]
        mirrored = {k: v[f"{prefix}_{k}"] for k in value if f"{prefix}_{k}" in v}
        if mirrored and not any(isinstance(x, dict) for x in value.values()):
            _set(cfg, key, {**value, **mirrored})


def _moe_layers(cfg: Any) -> set[int] | None:
    """The layers a MoE config's lists make MoE: ``mlp_layer_types`` entries
    other than "dense" (Step-3.x, GLM-5's DSA), ``moe_layers`` (Llama 4),
    every layer not in ``mlp_only_layers`` (Qwen-MoE style, Flint: layers 0
    and 1 dense); None where no list says (counts such as DeepSeek-V3's
    ``first_k_dense_replace`` are fitted after the cut, _keep_a_moe_layer)."""
    v = vars(cfg)
    if not any(_int(v.get(k)) for k in _EXPERT_KEYS):
        return None
    n = next((v[k] for k in _LAYER_KEYS if _int(v.get(k))), None)
    kinds = v.get("mlp_layer_types")
    if isinstance(kinds, (list, tuple)) and kinds:
        return {i for i, k in enumerate(kinds) if k != "dense"}
    moe = v.get("moe_layers")
    if isinstance(moe, (list, tuple)) and all(_int(i) for i in moe):
        return set(moe)
    dense = v.get("mlp_only_layers")
    if isinstance(dense, (list, tuple)) and dense and _int(n):
        return set(range(n)) - set(dense)
    return None


def _kept_layers(cfg: Any) -> list[int]:
    """Which of the layers to keep: the first LAYERS, but one of each kind where
    ``layer_types`` names more (at most 4 kinds); and a MoE layer where the
    config's lists make its first layers dense (:func:`_moe_layers`): in place
    of the second of the first two, or added to the kinds."""
    picked = _kept_by_type(cfg)
    moe = _moe_layers(cfg)
    if moe and not set(picked) & moe:
        if picked == list(range(LAYERS)):
            picked = picked[:-1]
        picked = sorted([*picked, min(moe)])
    return picked


def _kept_by_type(cfg: Any) -> list[int]:
    v = vars(cfg)
    # Zamba's layer kinds are layers_block_type (mamba and hybrid: the shared
    # attention block first comes at layer 2 or 6; its first two layers have none)
    types = v.get("layer_types")
    if not isinstance(types, list) or not types:
        types = v.get("layers_block_type")
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


#: lists that name layers by their index, which the kept layers renumber:
#: per layer, the layer whose keys/values it reads (Kolibri 1.1, Mistral Large
#: 4); and sets of layers (Kolibri's indexer and dense-MLP layers). Other
#: index sets (SAM's global_attn_indexes, Qwen-VL's deepstack indexes, ...)
#: stay as they are: their models pass with the indexes past the kept layers.
_LAYER_POINTERS = ("kv_source_layers",)
_LAYER_SETS = {"kv_source_layers": ("index_layers", "mlp_only_layers")}


def _remap_layer_refs(cfg: Any, chosen: list[int]) -> None:
    """Renumber layer references after keeping layers ``chosen`` (old
    indexes): a layer that read a dropped layer's keys/values computes its own
    (Kolibri: layer 4 kept as layer 1 read its own, 4, now 1)."""
    new = {old: i for i, old in enumerate(chosen)}
    v = vars(cfg)
    for key in _LAYER_POINTERS:
        refs = v.get(key)
        if not (isinstance(refs, list) and len(refs) == len(chosen)):
            continue
        if not all(_int(r) for r in refs):
            continue
        _set(cfg, key, [new.get(r, i) for i, r in enumerate(refs)])
        for other in _LAYER_SETS.get(key, ()):
            layers = v.get(other)
            if isinstance(layers, list) and all(_int(r) for r in layers):
                _set(cfg, other, [new[r] for r in layers if r in new])


#: lists of layer indexes (not one value per layer): renumbered to the kept
#: layers, indexes of dropped layers left out (MoE layer sets, LFM2's
#: full-attention layers, Zamba2's hybrid layers). Not the vision towers'
#: block sets (SAM's global_attn_indexes, Qwen2.5-VL's fullatt_block_indexes):
#: DeepSeek-VL-Hybrid reads SAM's by position (an empty set: IndexError), and
#: they pass with the indexes past the kept layers, as _LAYER_POINTERS says
_LAYER_INDEX_SETS = (
    "mlp_only_layers",
    "moe_layers",
    "full_attn_idxs",
    "hybrid_layer_ids",
    "local_layer_ids",
    "ple_layer_ids",
    "attn_layer_indices",
)


def _remap_layer_sets(cfg: Any, chosen: list[int]) -> None:
    """Layer index lists (:data:`_LAYER_INDEX_SETS`) renumbered to the kept
    layers ``chosen`` (old indexes): an index of a dropped layer is left out
    (LFM2's full-attention layer 2 kept as layer 1 is 1; its 12 others go)."""
    new = {old: i for i, old in enumerate(chosen)}
    v = vars(cfg)
    for key in _LAYER_INDEX_SETS:
        refs = v.get(key)
        if not (isinstance(refs, (list, tuple)) and all(_int(r) for r in refs)):
            continue
        _set(cfg, key, type(refs)(new[r] for r in refs if r in new))


#: counts of leading dense layers before the MoE ones (DeepSeek-V3, Kimi,
#: GLM-4-MoE: first_k_dense_replace 3 of 61; AFMoE, LFM2-MoE: num_dense_layers)
_DENSE_FIRST = ("first_k_dense_replace", "num_dense_layers", "num_dense_blocks")
#: every n-th layer is MoE (NLLB-MoE, Switch: 4; Qwen2-MoE: 1; DeepSeek-V2's
#: moe_layer_freq; Jamba's expert_layer_period)
_MOE_STEPS = (
    "decoder_sparse_step",
    "encoder_sparse_step",
    "moe_layer_freq",
    "expert_layer_period",
)


def _keep_a_moe_layer(cfg: Any, layers: int) -> None:
    """A MoE config shrunk to ``layers`` layers keeps a MoE layer (and a dense
    one where it had both): its leading dense layers are 1 (layer 0 dense,
    layer 1 MoE), every n-th layer becomes every layer up to the count (NLLB's
    every 4th: layer 1 of 2), Ernie 4.5's MoE span ends inside the kept layers.
    Left alone, DeepSeek-V3 (3 dense first) kept 2 dense layers: no expert,
    no router checked."""
    v = vars(cfg)
    if not any(_int(v.get(k)) for k in _EXPERT_KEYS):
        return
    for key in _DENSE_FIRST:
        if _int(v.get(key)) and v[key] >= layers:
            _set(cfg, key, max(layers - 1, 0))
    for key in _MOE_STEPS:
        if _int(v.get(key)) and v[key] > layers:
            _set(cfg, key, layers)
    offset = v.get("expert_layer_offset")
    if _int(offset) and offset >= layers:
        _set(cfg, "expert_layer_offset", layers - 1)
    end = v.get("moe_layer_end_index")
    if _int(end) and end >= layers:
        _set(cfg, "moe_layer_end_index", layers - 1)
    start = v.get("moe_layer_start_index")
    if _int(start) and start >= layers:
        _set(cfg, "moe_layer_start_index", layers - 1)
    for key in ("mlp_only_layers",):  # every kept layer dense: the last is MoE
        dense = v.get(key)
        if isinstance(dense, (list, tuple)) and set(range(layers)) <= set(dense):
            _set(cfg, key, type(dense)(i for i in dense if i != layers - 1))


def _wide_attention(cfg: Any) -> int | None:
    """Zamba2's shared attention block reads the hidden state concatenated
    with the input embeddings: ``attention_hidden_size`` is a multiple of the
    width (2 x 2,560); that multiple, read before the caps, else None."""
    v = vars(cfg)
    attn, hidden = v.get("attention_hidden_size"), v.get("hidden_size")
    if _int(attn) and _int(hidden) and hidden > 0 and attn > hidden:
        if attn % hidden == 0:
            return attn // hidden
    return None


def _fit_wide_attention(cfg: Any, multiple: int) -> None:
    """The capped attention width back at its multiple of the width (the
    name cap made it 32 of a 64-wide input: its norm refused the shape once
    a hybrid layer was kept), and its head width to match."""
    v = vars(cfg)
    hidden, heads = v.get("hidden_size"), v.get("num_attention_heads")
    if not _int(hidden):
        return
    _set(cfg, "attention_hidden_size", multiple * hidden)
    if _int(v.get("attention_head_dim")) and _int(heads) and heads > 0:
        _set(cfg, "attention_head_dim", multiple * hidden // heads)


def _grouped_query(cfg: Any) -> bool:
    """Whether ``cfg`` has fewer key/value heads than query heads (grouped
    query attention), read before the caps."""
    v = vars(cfg)
    kv = next((v[k] for k in _KV_KEYS if _int(v.get(k))), None)
    heads = next((v[k] for k in _HEAD_KEYS if _int(v.get(k))), None)
    return kv is not None and heads is not None and 0 < kv < heads


def _fit_grouped_query(cfg: Any) -> None:
    """Grouped query attention stays grouped: the caps make 2 heads of 2
    key/value heads (plain multi-head attention: the repeat of key/value
    heads across query heads, the GQA code path, never ran). One key/value
    head per 2 query heads."""
    v = vars(cfg)
    heads = next((v[k] for k in _HEAD_KEYS if _int(v.get(k))), None)
    if not _int(heads) or heads < 2:
        return
    for key in _KV_KEYS:
        if _int(v.get(key)) and v[key] >= heads:
            _set(cfg, key, max(1, heads // 2))


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
    "bottleneck",  # MobileBERT's intra_bottleneck_size: its true_hidden_size
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
        elif low.endswith("linear_units") and value > FFN:
            _set(cfg, key, FFN)  # FastSpeech2-Conformer's feed-forward widths
        elif low.endswith("postnet_units") and value > HIDDEN:
            _set(cfg, key, HIDDEN)
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
    # PP-LCNet V3 (PP-OCRv5's backbone) scales every block's channels by
    # ``scale`` (0.75: blocks up to 480 wide, 3.2M parameters shrunk): like
    # width_coefficient, 0.25. (V4 scales only the channels it reports, not
    # its blocks': left alone.)
    scale = vars(cfg).get("scale")
    if type(cfg).__name__ == "PPLCNetV3Config" and isinstance(scale, float):
        if scale > 0.25:
            _set(cfg, "scale", 0.25)


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
    """BLIP-2 / InstructBLIP(-Video) put their Q-Former's query outputs where the ids
    hold the image (video) token: at most QUERY_TOKENS queries, and an image token id
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
    # InstructBLIP-Video: its video token (``video_token_index``), None in the
    # default, which the forward compares the ids with (a Python bool then)
    if "video_token_index" in vars(cfg) and cfg.video_token_index is None:
        if _int(vocab) and vocab > 2:
            _set(cfg, "video_token_index", vocab - 1)


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


def _fit_efficientnet(cfg: Any) -> None:
    """EfficientNet's top convolution is ``round_filters(1280)`` wide (scaled by
    ``width_coefficient``) and its batch norm ``hidden_dim`` wide (equal in the
    default, 2,560): the norm follows the shrunk coefficient (320 at 0.25)."""
    if type(cfg).__name__ != "EfficientNetConfig" or not _int(
        vars(cfg).get("hidden_dim")
    ):
        return
    from transformers.models.efficientnet.modeling_efficientnet import round_filters

    _set(cfg, "hidden_dim", int(round_filters(cfg, 1280)))


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


def _head_size(cfg: Any) -> int | None:
    """One attention head's width: ``head_dim`` where set, else width / heads."""
    v = vars(cfg)
    if _int(v.get("head_dim")) and v["head_dim"] > 0:
        return v["head_dim"]
    hidden = next((v[k] for k in _HIDDEN_KEYS if _int(v.get(k))), None)
    heads = next((v[k] for k in _HEAD_KEYS if _int(v.get(k))), None)
    return hidden // heads if hidden and heads else None


def _fit_rotary(cfg: Any, old_head: int | None) -> None:
    """Partial rotary embeddings by width (GPT-J, CodeGen: ``rotary_dim`` 64 of
    256-wide heads): a rotary width must not exceed the head, so it keeps its
    share of the shrunk head (an even number: RoPE rotates pairs), >= 2."""
    rotary, head = vars(cfg).get("rotary_dim"), _head_size(cfg)
    if not (_int(rotary) and _int(head) and rotary > 0):
        return
    share = rotary / old_head if _int(old_head) and old_head >= rotary else 1.0
    new = min(head, max(2, 2 * round(head * share / 2)))
    if new != rotary:
        _set(cfg, "rotary_dim", new)


#: the section Ernie 4.5-VL's RoPE reads when its config names none (for
#: 128-wide heads: 64 frequencies)
_ERNIE_MROPE = [22, 22, 20]


def _fit_mrope_section(cfg: Any) -> None:
    """Multimodal RoPE splits a head's frequencies (head / 2) into sections
    for time, height and width (``rope_parameters["mrope_section"]``, e.g. 16,
    24, 24 of 64): scaled to the shrunk head, each >= 1. Ernie 4.5-VL reads
    a default section when its config has none: written in, scaled."""
    rope, head = vars(cfg).get("rope_parameters"), _head_size(cfg)
    if not isinstance(rope, dict) or not _int(head) or "rope_theta" not in rope:
        return
    section = rope.get("mrope_section")
    if section is None and type(cfg).__name__.startswith("Ernie4_5_VL"):
        section = _ERNIE_MROPE
    if not (isinstance(section, (list, tuple)) and all(_int(x) for x in section)):
        return
    total = head // 2
    if sum(section) == total or total < len(section) or not sum(section):
        return
    new = [max(1, round(x * total / sum(section))) for x in section]
    new[-1] = total - sum(new[:-1])
    if new[-1] >= 1:
        rope["mrope_section"] = new


def _fit_expert_groups(cfg: Any) -> None:
    """Group-limited routing (DeepSeek-V3's family: AXK1, Bailing, Beam): the
    experts split into ``n_group`` equal groups of >= 2 (each group scores its
    top 2), the best ``topk_group`` groups are kept; 8 groups of the 4 kept
    experts are 0 wide. Groups of 2 (half of them kept, as the defaults' 4 of
    8), and the kept groups hold at least the top-k experts."""
    v = vars(cfg)
    experts = next((v[k] for k in _EXPERT_KEYS if _int(v.get(k))), None)
    key = next((k for k in ("n_group", "num_expert_group") if _int(v.get(k))), None)
    if key is None or not _int(experts) or v[key] <= 1:
        return
    groups = max(1, min(v[key], experts // 2))
    while experts % groups:
        groups -= 1
    _set(cfg, key, groups)
    top = v.get("topk_group")
    if _int(top):
        kept = max(1, min(top, groups // 2))
        topk = next(
            (getattr(cfg, k) for k in _TOPK_KEYS if _int(getattr(cfg, k, None))), 1
        )
        while kept < groups and kept * (experts // groups) < topk:
            kept += 1
        _set(cfg, "topk_group", kept)


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
    elif len(channels) == len(enc) + 1 and _int(v.get("x4_feat_dim")):
        # PP-DocLayout-V3: the first (stride 4) map feeds the mask head
        # (``x4_feat_dim``), the others the encoder
        _set(cfg, "x4_feat_dim", channels[0])
        _set(cfg, "encoder_in_channels", channels[1:])


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


def _fit_fpn_scales(cfg: Any) -> None:
    """SAM 3's tracker: a plain ViT backbone (patch grid image / patch) whose
    FPN rescales the grid by ``scale_factors`` (4, 2, 1, 0.5); the model views
    each level as ``backbone_feature_sizes`` (288, 144, 72 for 1008 / 14): the
    sizes follow the shrunk grid (64 / 14 = 4: 16, 8, 4)."""
    v = vars(cfg)
    sizes, scales = v.get("backbone_feature_sizes"), v.get("scale_factors")
    backbone = v.get("backbone_config")
    if not (
        _is_config(backbone)
        and isinstance(sizes, (list, tuple))
        and isinstance(scales, (list, tuple))
        and len(scales) >= len(sizes)
    ):
        return
    image = _first_int(getattr(backbone, "image_size", None))
    patch = _first_int(getattr(backbone, "patch_size", None))
    if getattr(backbone, "patch_stride", None) is not None or not (image and patch):
        return
    grid = image // patch
    _set(
        cfg,
        "backbone_feature_sizes",
        [[max(int(grid * s), 1)] * 2 for s in scales[: len(sizes)]],
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


def _fit_doubling_encoder(cfg: Any) -> None:
    """A codec's acoustic encoder whose channels double at each of its
    ``downsampling_ratios`` from ``encoder_hidden_size`` (NeuCodec, X-Codec 2:
    5 stages, 32 x 2**5 = 1,024 wide at the end with kernels of 2 x the
    stride: 11.5M parameters in the last block shrunk, float64 fd past 90 s):
    the last stage at most 4 x HIDDEN (128) wide, the first >= 2."""
    v = vars(cfg)
    width, ratios = v.get("encoder_hidden_size"), v.get("downsampling_ratios")
    if _int(width) and isinstance(ratios, (list, tuple)) and ratios:
        _set(cfg, "encoder_hidden_size", min(width, max(2, 4 * HIDDEN >> len(ratios))))


def _fit_upsampler(cfg: Any) -> None:
    """HiFi-GAN vocoders (VITS, SeamlessM4T): each upsampling stage halves the
    channels from ``upsample_initial_channel`` (capped to 8 by name): 4 or 5
    stages then leave 0 channels (a zero-width convolution, whose init divides
    by its width). Enough to halve once per stage and end 2 wide. And x2 per
    stage, not 8 x 8 x 2 x 2 = 256 samples a frame (VITS's fd ran past 90 s on
    2 x 90,000 samples): 16 a frame, each stage's kernel 2 x its stride as
    HiFi-GAN's are (padding (kernel - stride) / 2 keeps lengths exact)."""
    v = vars(cfg)
    rates, start = v.get("upsample_rates"), v.get("upsample_initial_channel")
    if not (_int(start) and isinstance(rates, (list, tuple))):
        return
    if not all(_int(r) for r in rates):
        return
    _set(cfg, "upsample_initial_channel", max(start, 2 ** (len(rates) + 1)))
    kernels = v.get("upsample_kernel_sizes")
    if isinstance(kernels, (list, tuple)) and len(kernels) == len(rates):
        _set(cfg, "upsample_rates", type(rates)(min(r, 2) for r in rates))
        _set(cfg, "upsample_kernel_sizes", type(kernels)(min(k, 4) for k in kernels))


def _fit_sampling(cfg: Any) -> None:
    """VITS samples in its forward, at inference too: the durations' flow from
    ``randn x noise_scale_duration`` and the waveform's latents ``mean + randn x
    std x noise_scale``. Each call then has another output (its length too), no
    function to differentiate. At scale 0 the forward is its mean path, a
    function of the weights (the draws still happen, times 0)."""
    for key in ("noise_scale", "noise_scale_duration"):
        if isinstance(vars(cfg).get(key), float):
            _set(cfg, key, 0.0)


def _fit_layout(cfg: Any) -> None:
    """Document models that embed a box as 6 parts concatenated to the width:
    LayoutLMv2/v3 (4 coordinates of ``coordinate_size`` + 2 of ``shape_size``),
    LiLT (6 of width // 6, then a layout stream ``channel_shrink_ratio`` times
    narrower whose heads are that much narrower too)."""
    v = vars(cfg)
    hidden, heads = v.get("hidden_size"), v.get("num_attention_heads")
    if not (_int(hidden) and _int(heads)):
        return
    if _int(v.get("coordinate_size")) and _int(v.get("shape_size")):
        coordinate = hidden // 6
        _set(cfg, "coordinate_size", coordinate)
        _set(cfg, "shape_size", (hidden - 4 * coordinate) // 2)
    ratio = v.get("channel_shrink_ratio")
    if _int(ratio) and ratio > 0:
        # width a multiple of 6 (the box parts) and of heads x ratio (each
        # layout head is head / ratio wide): 48 at 2 heads and ratio 4
        step = math.lcm(6, heads * ratio)
        _set(cfg, "hidden_size", step * max(1, -(-hidden // step)))


def _fit_blt(cfg: Any) -> None:
    """BLT derives two widths when its config is made, not when they change:
    the local encoder/decoder's ``hidden_size_global`` (the global
    transformer's width) and the global transformer's
    ``encoder_cross_output_size`` (the encoder's width x ``cross_attn_k``, None
    where that is already the global width): derive them again."""
    v = vars(cfg)
    glob, enc = v.get("global_config"), v.get("encoder_config")
    if not (_is_config(glob) and _is_config(enc) and _int(v.get("cross_attn_k"))):
        return
    if not hasattr(glob, "encoder_cross_output_size"):
        return
    width = glob.hidden_size
    for sub in (enc, v.get("decoder_config")):
        if _is_config(sub) and _int(vars(sub).get("hidden_size_global")):
            _set(sub, "hidden_size_global", width)
    cross = enc.hidden_size * v["cross_attn_k"]
    _set(glob, "encoder_cross_output_size", None if cross == width else cross)


#: widths a config derives from others when it is made (a None default filled
#: in ``__post_init__``), so a shrink of those leaves them behind: EnCodec's
#: ``codebook_dim`` (its width), X-Codec's (the acoustic + the semantic
#: width), NeuCodec / X-Codec 2's ``quantization_dim`` (its width + the
#: semantic model's), ViT's ``pooler_output_size`` (its width)
_DERIVED = ("codebook_dim", "quantization_dim", "pooler_output_size")


def _width_of(cfg: Any, path: str) -> int | None:
    """``hidden_size`` of ``cfg`` ("") or of its nested config ``path``."""
    sub = cfg if not path else vars(cfg).get(path)
    value = vars(sub).get("hidden_size") if _is_config(sub) else None
    return value if _int(value) else None


def _derived_widths(cfg: Any) -> dict[str, tuple[str, ...]]:
    """Which of the _DERIVED widths equal the config's width, or its width plus
    a nested config's, or two nested configs' widths added (before the
    shrink): key -> the configs whose widths add up to it ("" is cfg)."""
    v = vars(cfg)
    parts = [""] + [k for k, sub in v.items() if _is_config(sub)]
    widths = {p: _width_of(cfg, p) for p in parts}
    widths = {p: w for p, w in widths.items() if w}
    found: dict[str, tuple[str, ...]] = {}
    for key in _DERIVED:
        value = v.get(key)
        if not _int(value):
            continue
        names = list(widths)
        combos = [(p,) for p in names] + [
            (a, b) for i, a in enumerate(names) for b in names[i + 1 :]
        ]
        for combo in combos:
            if sum(widths[p] for p in combo) == value:
                found[key] = combo
                break
    return found


def _fit_backbone_outputs(cfg: Any, old_layers: set[int]) -> None:
    """A ViT used as a backbone names its outputs by layer (``stage_names``
    stem, stage1 .. stage10; LW-DETR's ``out_indices`` 2, 4, 5, 9): after the
    layer cap the stages past the kept layers give no feature map, and a model
    that sizes its projector by ``len(out_indices)`` then gets fewer maps than
    it expects. Stages follow the kept layers; each index past them is the
    last kept layer's (deduplicated: the projector sizes follow the count)."""
    v = vars(cfg)
    names, layers = v.get("stage_names"), v.get("num_hidden_layers")
    if not (isinstance(names, list) and _int(layers) and old_layers):
        return
    if isinstance(v.get("depths"), (list, tuple)) or len(names) <= layers + 1:
        return
    if names[0] != "stem" or not all(
        n == f"stage{i}" for i, n in enumerate(names) if i
    ):
        return
    indices = getattr(cfg, "out_indices", None)
    if not isinstance(indices, (list, tuple)) or not all(_int(i) for i in indices):
        return
    new = sorted({min(i, layers) for i in indices})
    _set(cfg, "stage_names", ["stem"] + [f"stage{i}" for i in range(1, layers + 1)])
    try:
        cfg.set_output_features_output_indices(out_features=None, out_indices=new)
    except (AttributeError, TypeError, ValueError):
        pass


def _fit_lw_detr(cfg: Any) -> None:
    """LW-DETR's default config projects no feature level
    (``projector_scale_factors`` ()), so nothing reaches its encoder and
    transformers cannot run it (``torch.cat(): expected a non-empty list``):
    one level at scale 1, the LW-DETR tiny/small checkpoints' value, with the
    widths its config derives from it."""
    v = vars(cfg)
    if type(cfg).__name__ != "LwDetrConfig" or v.get("projector_scale_factors"):
        return
    width = v.get("d_model")
    if not _int(width):
        return
    _set(cfg, "projector_scale_factors", [1.0])
    _set(cfg, "projector_in_channels", [width])
    _set(cfg, "projector_out_channels", width)
    _set(cfg, "num_feature_levels", 1)


def _fit_efficientloftr(cfg: Any) -> None:
    """EfficientLoFTR derives its RepVGG blocks' widths and strides and its fine
    fusion widths from ``out_features`` (64, 64, 128, 256) and
    ``stage_num_blocks`` (1, 2, 4, 14) when the config is made, and needs
    ``hidden_size`` == the last stage's width: widths / 8 (the last one 32, the
    capped width), at most 2 blocks a stage, the derived lists derived again,
    and its RoPE's share follows the heads."""
    v = vars(cfg)
    if type(cfg).__name__ != "EfficientLoFTRConfig":
        return
    feats, blocks = v.get("out_features"), v.get("stage_num_blocks")
    strides, hidden = v.get("stage_stride"), v.get("hidden_size")
    if not all(isinstance(x, list) for x in (feats, blocks, strides)) or not _int(
        hidden
    ):
        return
    scale = max(feats[-1] // hidden, 1)
    feats = [max(c // scale, 2) for c in feats]
    blocks = [min(n, 2) for n in blocks]
    ins = [1] + feats[:-1]
    outs = [[feats[i]] * n for i, n in enumerate(blocks)]
    _set(cfg, "out_features", feats)
    _set(cfg, "stage_num_blocks", blocks)
    _set(cfg, "stage_in_channels", ins)
    _set(
        cfg,
        "stage_block_stride",
        [[s] + [1] * (n - 1) for s, n in zip(strides, blocks, strict=True)],
    )
    _set(cfg, "stage_block_out_channels", outs)
    _set(
        cfg, "stage_block_in_channels", [[ins[i]] + o[:-1] for i, o in enumerate(outs)]
    )
    _set(cfg, "fine_fusion_dims", list(reversed(feats))[:-1])
    _set(cfg, "hidden_size", feats[-1])
    # its 2-D RoPE fills width / 4 frequencies from head x partial_rotary_factor
    # / 2 (8 heads x 4.0 in the default): the factor is heads / 2
    rope, heads = v.get("rope_parameters"), v.get("num_attention_heads")
    if isinstance(rope, dict) and _int(heads) and "partial_rotary_factor" in rope:
        rope["partial_rotary_factor"] = heads / 2


def _fit_lightglue(cfg: Any) -> None:
    """LightGlue matches the keypoint detector's descriptors
    (``descriptor_decoder_dim``, 256) at its own width (``descriptor_dim`` =
    ``hidden_size``, 256): both follow the capped width."""
    v = vars(cfg)
    det, hidden = v.get("keypoint_detector_config"), v.get("hidden_size")
    if not (_is_config(det) and _int(v.get("descriptor_dim")) and _int(hidden)):
        return
    if _int(vars(det).get("descriptor_decoder_dim")):
        _set(cfg, "descriptor_dim", hidden)
        _set(det, "descriptor_decoder_dim", hidden)
    # the detector keeps the keypoints scoring over a threshold: how many
    # changes with the weights, and so do the matcher's shapes within a
    # finite-difference step ("size of tensor a (76) must match ... (77)").
    # A fixed count: the best 16 (of ~30 left after NMS at 64 x 64), threshold 0
    if _int(vars(det).get("max_keypoints")) and "keypoint_threshold" in vars(det):
        _set(det, "max_keypoints", 16)
        _set(det, "keypoint_threshold", 0.0)


def _fit_clvp(cfg: Any) -> None:
    """CLVP feeds its speech decoder's token ids to its speech encoder, whose
    vocabulary is 256 against the decoder's 8,194 (1,024 capped): an id past
    256 fails the encoder's embedding (the default config too, a transformers
    bug). The decoder's vocabulary is the encoder's. And the encoders' heads
    are as wide as their rotary embedding."""
    v = vars(cfg)
    if type(cfg).__name__ == "ClvpEncoderConfig":
        # its rotary embedding is max(projection / (2 x heads), 32) wide by
        # construction: heads >= 32 wide (64 at 2 heads), all of it rotated
        hidden, heads = v.get("hidden_size"), v.get("num_attention_heads")
        if _int(hidden) and _int(heads) and hidden < 32 * heads:
            _set(cfg, "hidden_size", 32 * heads)
        return
    dec, speech = v.get("decoder_config"), v.get("speech_config")
    if type(cfg).__name__ != "ClvpConfig" or not (
        _is_config(dec) and _is_config(speech)
    ):
        return
    vocab = vars(speech).get("vocab_size")
    if _int(vocab) and _int(vars(dec).get("vocab_size")) and dec.vocab_size > vocab:
        _set(dec, "vocab_size", vocab)
        for key, value in list(vars(dec).items()):
            if key.endswith("_token_id") and _int(value) and value >= vocab:
                _set(dec, key, value % vocab)


def _fit_uvdoc(cfg: Any) -> None:
    """UVDoc: channels in tuples no width cap names (a ResNet of 3, 4, 6 blocks
    up to 128 wide, 6 dilated bridges of up to 3 blocks 128 wide: 7.9M
    parameters shrunk): every width / 8 (3 colour channels in, 2 coordinates
    out kept), 2 blocks a ResNet stage, 1 a bridge. And its head fuses all 6
    bridges' maps (``bridge_connector[0]`` x 6 channels) while the default
    backbone reports the last one only (``out_features`` ['stage6']): the
    default config cannot run (a transformers bug); the backbone reports every
    bridge, as the head reads them."""
    v = vars(cfg)
    backbone = v.get("backbone_config")
    if type(cfg).__name__ != "UVDocConfig" or not _is_config(backbone):
        return
    b = vars(backbone)
    if not all(
        isinstance(x, (list, tuple))
        for x in (b.get("resnet_head"), b.get("resnet_configs"), b.get("stage_configs"))
    ):
        return

    def w(c: int) -> int:
        return c if c <= 3 else max(c // 8, 2)

    _set(backbone, "resnet_head", [[w(i), w(o)] for i, o in b["resnet_head"]])
    _set(
        backbone,
        "resnet_configs",
        [
            [[w(i), w(o), *rest] for i, o, *rest in stage[:2]]
            for stage in b["resnet_configs"]
        ],
    )
    _set(
        backbone,
        "stage_configs",
        [[[w(c), *rest] for c, *rest in bridge[:1]] for bridge in b["stage_configs"]],
    )
    _set(backbone, "depths", [len(bridge) for bridge in b["stage_configs"]])
    stages = [f"stage{i}" for i in range(1, len(b["stage_configs"]) + 1)]
    backbone.set_output_features_output_indices(out_features=stages, out_indices=None)
    if isinstance(v.get("bridge_connector"), (list, tuple)):
        _set(cfg, "bridge_connector", [w(c) for c in v["bridge_connector"]])
    points = v.get("out_point_positions2D")
    if isinstance(points, (list, tuple)):
        _set(cfg, "out_point_positions2D", [[w(i), w(o)] for i, o in points])


def _fit_swa_heads(cfg: Any) -> None:
    """MiMo-V2-Flash's sliding-window layers have twice the key/value heads of
    its full layers (8 and 4 of 64 query heads); at 2 query heads and 2
    key/value heads the sliding layers had 4 (2 // 4 = 0 groups). One
    key/value head, so they have 2: grouped query attention kept."""
    if type(cfg).__name__ != "MiMoV2FlashConfig":
        return
    heads, kv = (
        vars(cfg).get("num_attention_heads"),
        vars(cfg).get("num_key_value_heads"),
    )
    if _int(heads) and _int(kv) and 2 * kv > heads:
        _set(cfg, "num_key_value_heads", max(1, heads // 2))


def _fit_indexer_heads(cfg: Any) -> None:
    """Kolibri 1.1's indexer reads ``index_num_heads`` of the query heads that
    share key/value head 0 (12 of 48 / 4 in the default; its config checks
    it): at most heads / key-value heads (1 at 2 and 2)."""
    v = vars(cfg)
    index, heads, kv = (
        v.get("index_num_heads"),
        v.get("num_attention_heads"),
        v.get("num_key_value_heads"),
    )
    if _int(index) and _int(heads) and _int(kv) and kv > 0:
        _set(cfg, "index_num_heads", max(1, min(index, heads // kv)))


def _fit_inkling_scales(cfg: Any) -> None:
    """Inkling's vision tower assigns its layers to the patch's scales (1 + the
    prime factors of the patch and the temporal patch: 6 for 40 and 2): with
    fewer layers than scales it solves the assignment with scipy (not a
    transformers dependency; absent here), with as many or more by argmin.
    Layers >= scales (4 at patches of 4, over the layer cap: the code path
    without scipy needs them)."""
    if type(cfg).__name__ != "InklingVisionConfig":
        return
    v = vars(cfg)
    patch, temporal, layers = (
        v.get("patch_size"),
        v.get("temporal_patch_size"),
        v.get("n_layers"),
    )
    if not (_int(patch) and _int(temporal) and _int(layers)):
        return
    if patch > 4:
        # each spatial scale projects to h**2 x channels (40 x 40 x 3 = 4,800
        # wide at the last: 23M parameters shrunk) and the temporal one to
        # 64 x that: patches of 4 (1.8M parameters in all)
        _set(cfg, "patch_size", 4)
        patch = 4
    from transformers.models.inkling.modeling_inkling import prime_factors

    scales = 1 + len(prime_factors(patch)) + len(prime_factors(temporal))
    if layers < scales:
        _set(cfg, "n_layers", scales)


def _fit_depth_pro(cfg: Any) -> None:
    """DepthPro tiles the image, scaled by ``scaled_images_ratios`` (0.25, 0.5,
    1), into ``patch_size`` tiles (384) that its ViTs take whole (their
    ``image_size``): the image must be >= patch / 0.25 (1,536), not 64. Tiles
    of 64 x 0.25 = 16 (the ViTs' image 16, patches of 4: a 4 x 4 grid); the
    layers it hooks (11 and 5 of 12) the kept ones in the same order; its
    neck's widths (1,024 .. 256; 13.7M parameters) scaled like the width
    (1,024 -> 32)."""
    v = vars(cfg)
    if type(cfg).__name__ != "DepthProConfig":
        return
    ratios = v.get("scaled_images_ratios")
    if not (isinstance(ratios, (list, tuple)) and ratios and _int(v.get("patch_size"))):
        return
    tile = max(int(IMAGE * min(ratios)), 4)
    _set(cfg, "patch_size", tile)
    layers = None
    for key in ("image_model_config", "patch_model_config", "fov_model_config"):
        sub = v.get(key)
        if _is_config(sub):
            _set(sub, "image_size", tile)
            _set(sub, "patch_size", 4)
            layers = layers or getattr(sub, "num_hidden_layers", None)
    hooks = v.get("intermediate_hook_ids")
    if isinstance(hooks, (list, tuple)) and _int(layers):
        # deepest first, as the default's (11, 5)
        _set(
            cfg,
            "intermediate_hook_ids",
            [max(layers - 1 - i, 0) for i in range(len(hooks))],
        )
    dims = [
        d
        for k in ("scaled_images_feature_dims", "intermediate_feature_dims")
        for d in (v.get(k) or ())
    ]
    if dims and all(_int(d) for d in dims) and max(dims) > HIDDEN:
        top = max(dims)
        for key in ("scaled_images_feature_dims", "intermediate_feature_dims"):
            if isinstance(v.get(key), (list, tuple)):
                _set(cfg, key, [max(d * HIDDEN // top, 2) for d in v[key]])


def _fit_unset_window(cfg: Any) -> None:
    """Step 3.7's text model builds a sliding-window mask on every forward (for
    its sliding layers, which the default config has none of) and refuses a
    ``sliding_window`` of None, its default: transformers cannot run the
    default config either. A window of 4 (half the 8 tokens checked), which no
    kept layer uses: every layer of the default is full attention."""
    v = vars(cfg)
    types = v.get("layer_types")
    if (
        "num_sliding_attention_heads" in v
        and "sliding_window" in v
        and v["sliding_window"] is None
        and isinstance(types, list)
        and "sliding_attention" not in types
    ):
        _set(cfg, "sliding_window", 4)


def _fit_staged_audio(cfg: Any) -> None:
    """CLAP's audio tower: a Swin whose stages double from
    ``patch_embeds_hidden_size`` (96 .. 768) and whose ``hidden_size`` (read
    by the projection) is the last stage's width: stages from 8 (each of 2
    heads >= 4 wide), ``hidden_size`` 8 x 2**(stages - 1) (64 for 4)."""
    v = vars(cfg)
    base, depths = v.get("patch_embeds_hidden_size"), v.get("depths")
    if not (_int(base) and isinstance(depths, (list, tuple)) and depths):
        return
    if not _int(v.get("hidden_size")):
        return
    base = min(base, STAGED_WIDTH // 2)
    _set(cfg, "patch_embeds_hidden_size", base)
    _set(cfg, "hidden_size", base * 2 ** (len(depths) - 1))


def _fit_visual_prompt(cfg: Any) -> None:
    """TVP pads a learned frame ``visual_prompt_size`` wide inside images of
    exactly ``max_img_size`` (448 and 96): the image cap (64), and a frame that
    leaves a 32 x 32 middle (16)."""
    v = vars(cfg)
    size, pad = v.get("max_img_size"), v.get("visual_prompt_size")
    if _int(size) and _int(pad) and size > IMAGE:
        _set(cfg, "max_img_size", IMAGE)
        _set(cfg, "visual_prompt_size", min(pad, IMAGE // 4))


def _fit_bridgetower(cfg: Any) -> None:
    """BridgeTower's vision tower builds ``nn.MultiheadAttention(width, width //
    64)``: its heads are 64 wide by construction, so a width under 64 has 0
    heads. The one vision width kept at 64 (one head); unique to this model."""
    if type(cfg).__name__ != "BridgeTowerVisionConfig":
        return
    hidden = vars(cfg).get("hidden_size")
    if _int(hidden) and hidden < 64:
        _set(cfg, "hidden_size", 64)


def _fit_patch_grid(cfg: Any) -> None:
    """SAM: a patch grid's side derived from the image when the config is made
    (the prompt encoder's ``image_embedding_size`` = 1024 / 16 = 64) follows
    the shrunk image (64 / 16 = 4), as the vision tower's grid does; and the
    positional embedding follows the shrunk neck's width."""
    v = vars(cfg)
    size, patch = _first_int(v.get("image_size")), _first_int(v.get("patch_size"))
    if _int(v.get("image_embedding_size")) and size and patch:
        _set(cfg, "image_embedding_size", max(size // patch, 1))
    # the image's positional embedding (a sine and a cosine of num_pos_feats
    # frequencies each) is added to the neck's output_channels
    feats, channels = v.get("num_pos_feats"), v.get("output_channels")
    if _int(feats) and _int(channels) and 2 * feats != channels:
        _set(cfg, "num_pos_feats", max(channels // 2, 1))


def _fit_axial(cfg: Any) -> None:
    """Reformer: the axial position embedding's parts must add up to the width,
    and (in train mode, which its reversible backward requires) its shape must
    multiply to the sequence length: TOKENS as (2, TOKENS / 2), not 64 x 64.
    Chunks of TOKENS / 2 (not 64) so that the LSH layer hashes, sorts and
    chunks the tokens (with one chunk it attends to all of them directly, and
    its hashing code never runs), with the buckets the paper's rule gives
    (2 x chunks), set here rather than by the first forward. A fixed
    ``hash_seed``: every forward draws the same random rotations (left unset,
    each call hashes with new ones: not one function)."""
    v = vars(cfg)
    dims, hidden = v.get("axial_pos_embds_dim"), v.get("hidden_size")
    if isinstance(dims, (list, tuple)) and len(dims) == 2 and _int(hidden):
        if sum(dims) != hidden:
            _set(cfg, "axial_pos_embds_dim", type(dims)((hidden // 2, hidden // 2)))
    shape = v.get("axial_pos_shape")
    if isinstance(shape, (list, tuple)) and len(shape) == 2:
        _set(cfg, "axial_pos_shape", type(shape)((2, TOKENS // 2)))
    chunk = TOKENS // 2
    for key in ("lsh_attn_chunk_length", "local_attn_chunk_length"):
        if _int(v.get(key)) and v[key] > chunk:
            _set(cfg, key, chunk)
    lsh = v.get("lsh_attn_chunk_length")
    if "num_buckets" in v and v["num_buckets"] is None and _int(lsh):
        _set(cfg, "num_buckets", max(2 * (TOKENS // lsh), 2))
    if "hash_seed" in v and v["hash_seed"] is None:
        _set(cfg, "hash_seed", 0)


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


def _first_int(value: Any) -> int | None:
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    return value if _int(value) else None


#: per-level input widths of a neck or encoder fed by a backbone's feature maps
_LEVEL_WIDTH_KEYS = ("layer_list_out_channels", "encoder_in_channels")


def default_config_problem(model_type: str, cfg: Any) -> str | None:
    """Why transformers' own default config of ``model_type`` cannot run, where
    that shows in the config (``cfg``: the default, not shrunk); None
    otherwise. A neck that takes more feature maps than its backbone reports
    (PP-OCRv6 small det: 4 levels, ``layer_list_out_channels`` (12, 18, 42,
    360), from a backbone whose ``out_features`` is ['stage4']): the shrink
    cannot invent the checkpoint's backbone layout, so the model is reported
    as unbuildable with this reason, not an error from its forward."""
    import transformers

    backbone = vars(cfg).get("backbone_config")
    if not _is_config(backbone):
        return None
    maps = getattr(backbone, "out_features", None)
    if not isinstance(maps, (list, tuple)):
        return None
    for key in _LEVEL_WIDTH_KEYS:
        levels = vars(cfg).get(key)
        if isinstance(levels, (list, tuple)) and len(levels) > len(maps):
            return (
                f"transformers {transformers.__version__} cannot run {model_type} "
                f"from its default config either (not gradcheck's shrink): its "
                f"{type(cfg).__name__}.{key} takes {len(levels)} feature maps "
                f"{tuple(levels)}, but its backbone ({type(backbone).__name__}) "
                f"reports {len(maps)} (out_features {list(maps)}); a checkpoint's "
                f"config sets both. Give a consistent pair with overrides, e.g. "
                f"?backbone_config.out_features=[...]&{key}=[...] (the backbone's "
                f"stages' widths)."
            )
    return None
