"""transformers models by model type (``hf:<model_type>``): a shrunk config, random
weights, inferred inputs. Nothing is downloaded.

Used by :mod:`gradcheck.models`; imports transformers and torch only when called.
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Mapping
from typing import Any

from gradcheck.backends._hf_config import (  # noqa: F401 (re-exported)
    _EXPERT_KEYS,
    IMAGE,
    IMAGE_INPUT,
    INPUT_KINDS,
    TEXT,
    _first_int,
    _int,
    _is_config,
    _meta_count,
    apply_overrides,
    count_parameters_meta,
    load_config,
    shrink_config,
)

__all__ = ["build", "expand_all", "load_config", "shrink_config"]


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


#: the id range of a character model whose config names no vocabulary but
#: hashes each code point into buckets (CANINE): any code point is an id; these
#: are the first 1,024 (the shrink's vocabulary bound)
_CODE_POINTS = 1024


def _vocab(cfg: Any) -> tuple[Any, Any]:
    """(the vocabulary size token ids are drawn below, the config it came from):
    the text config's, the config's own, else the first nested config that has
    one (FastSpeech2Conformer-with-HiFi-GAN keeps it in ``model_config``), else
    the code-point range of a config that hashes code points
    (``num_hash_buckets``: CANINE); (None, cfg) when there is none."""
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for sub in (text, cfg, *_configs(cfg)):
        vocab = getattr(sub, "vocab_size", None)
        if _int(vocab) and vocab >= 2:
            return vocab, sub
    if _int(getattr(cfg, "num_hash_buckets", None)):
        return _CODE_POINTS, cfg
    return None, text


def _ids(torch: Any, gen: Any, cfg: Any, batch: int, seq: int) -> Any:
    vocab, text = _vocab(cfg)
    if vocab is None:
        raise ValueError(
            f"cannot draw token ids: {type(cfg).__name__} names no vocab_size "
            "(nor does any config nested in it); pass inputs= yourself"
        )
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
    if main not in INPUT_KINDS or (
        main not in sig and any(k in sig for k in INPUT_KINDS)
    ):
        # a main input name the forward does not take: transformers' default
        # ("input_ids") on a vision tower whose forward takes pixel values
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

    out_of_scope = not_checkable_reason(model_type, spec)
    if out_of_scope is not None:
        raise _unbuildable(out_of_scope)
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


def _model_class(model_type: str) -> Any:
    """The class ``AutoModel`` builds for ``model_type``, or None (unknown, or
    an optional dependency is missing)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    names = MODEL_MAPPING_NAMES.get(model_type)
    if not names:
        return None
    name = names[0] if isinstance(names, (list, tuple)) else names
    try:
        return getattr(transformers, name)
    except Exception:
        return None


#: annotations of required forward arguments that gradcheck draws itself
_DRAWN = ("Tensor", "int", "float", "bool", "inspect._empty")


def not_checkable(cls: Any) -> str | None:
    """Why a model class is outside ``hf:*`` by its nature (not by a failure of
    gradcheck's shrink or inputs), or None. Two rules, from the class alone:

    - it has no forward of its own (torch's unimplemented placeholder): Bark and
      GLM-Image's VQ-VAE are driven through ``generate``/``encode``/``decode``,
      so there is no model function of the inputs to check;
    - its forward requires an argument that is an object rather than a tensor
      (SAM-2/SAM-3/EdgeTAM video: an ``inference_session`` that the processor's
      tracking API fills frame by frame, with prompts and memory): not token
      ids, pixel values or audio values, and nothing one could draw at random.

    The reason says what to do instead (pass your own inputs)."""
    import torch

    forward = getattr(cls, "forward", None)
    if forward is None or forward is torch.nn.Module.forward:
        return (
            f"{cls.__name__} has no forward of its own (transformers drives it "
            "through generate/encode/decode only): there is no function of token "
            "ids, pixel values or audio values to check"
        )
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return None
    for name, p in params.items():
        if name == "self" or p.default is not inspect.Parameter.empty:
            continue
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        note = str(p.annotation)
        if not any(k in note for k in _DRAWN):
            kind = getattr(p.annotation, "__name__", note)
            return (
                f"{cls.__name__}.forward requires {name!r} (a {kind}: an object "
                "the processor's stateful API builds, not a tensor): not token ids, "
                "pixel values or audio values, and nothing gradcheck can draw"
            )
    return None


def not_checkable_reason(model_type: str, spec: str) -> str | None:
    """The unbuildable message of a type outside ``hf:*`` by its nature (see
    :func:`not_checkable`), with the way to check it anyway; else None."""
    cls = _model_class(model_type)
    why = not_checkable(cls) if cls is not None else None
    if why is None:
        return None
    return (
        f"{spec} is not in hf:*: {why}. To check it anyway, build the model and "
        "its inputs yourself and pass them: gradcheck.check_model(model, "
        "inputs={...})"
    )


def excluded() -> dict[str, str]:
    """Every model type AutoModel knows that ``hf:*`` leaves out, with the
    reason (what :func:`expand_all` does not return): a main input of another
    kind, or :func:`not_checkable`. For the sweep report's "not in hf:*" list."""
    return _scope()[1]


def expand_all() -> list[str]:
    """Every model type in transformers' CONFIG_MAPPING that AutoModel knows and
    whose model takes token ids, pixel values or audio values as its main input
    (the model class's ``main_input_name``; a class without one: its forward
    signature). Not models whose main input is another kind (time series, video,
    latents) that merely accept one of these too, nor those
    :func:`not_checkable` rules out (see :func:`excluded`). Nothing is built."""
    return _scope()[0]


def _scope() -> tuple[list[str], dict[str, str]]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    found, left_out = [], {}
    for model_type in CONFIG_MAPPING_NAMES:
        cls = _model_class(model_type)
        if cls is None:  # no AutoModel, or an optional dependency is missing
            continue
        try:
            main = getattr(cls, "main_input_name", None)
            sig = inspect.signature(cls.forward).parameters
        except Exception:
            continue
        if not (
            main in INPUT_KINDS or (main is None and any(k in sig for k in INPUT_KINDS))
        ):
            left_out[model_type] = (
                f"{cls.__name__}'s main input is {main!r}, not token ids, pixel "
                "values or audio values"
            )
            continue
        why = not_checkable(cls)
        if why is not None:
            left_out[model_type] = why
            continue
        found.append(model_type)
    return found, left_out
