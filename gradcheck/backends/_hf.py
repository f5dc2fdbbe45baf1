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
    AUDIO,
    IMAGE,
    IMAGE_INPUT,
    INPUT_KINDS,
    TEXT,
    TOKENS,
    _first_int,
    _int,
    _is_config,
    _meta_count,
    apply_overrides,
    count_parameters_meta,
    default_config_problem,
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


def _encoder_side(cfg: Any) -> Any:
    """The config the encoder's token ids come from: an encoder-decoder's own
    ``encoder_config`` when that names a vocabulary (Dia: bytes, 256, while the
    text config is the decoder's), else ``cfg``."""
    enc = getattr(cfg, "encoder_config", None)
    if getattr(cfg, "is_encoder_decoder", False) and _is_config(enc):
        if _int(getattr(enc, "vocab_size", None)):
            return enc
    return cfg


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
    batch, seq = 2, TOKENS
    inputs: dict[str, Any] = {}
    for name in wanted:
        if name == TEXT:
            inputs[name] = _ids(torch, gen, _encoder_side(cfg), batch, seq)
        elif name == IMAGE_INPUT:
            vis = _sub(cfg, "vision_config", "backbone_config")
            channels = getattr(vis, "num_channels", None) or 3
            size = getattr(vis, "image_size", None) or IMAGE
            h, w = (size, size) if _int(size) else tuple(size)[:2]
            inputs[name] = torch.randn(batch, channels, h, w, generator=gen)
        elif name == "input_values":
            inputs[name] = torch.randn(batch, _samples(cfg), generator=gen)
        elif name == "input_features":
            # Nemotron-3.5 Transcribe keeps its audio encoder's config as asr_config
            aud = _sub(cfg, "audio_config", "encoder_config", "asr_config")
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
    queries = getattr(cfg, "num_query_tokens", None)
    image = getattr(cfg, "image_token_id", None)
    if not _int(image):  # InstructBLIP-Video: its query outputs go to video tokens
        image = getattr(cfg, "video_token_id", None)
    if TEXT in inputs and IMAGE_INPUT in inputs and _int(queries) and _int(image):
        # BLIP-2: one image token per query in front of the text, none in it
        text = torch.where(inputs[TEXT] == image, image - 1, inputs[TEXT])
        marks = torch.full((batch, queries), image, dtype=text.dtype)
        inputs[TEXT] = torch.cat([marks, text], dim=1)
        seq = inputs[TEXT].shape[1]
    if "attention_mask" in sig and TEXT in inputs:
        inputs["attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
    for param in sig if TEXT in inputs else ():
        # other id streams beside the tokens, each from its own vocabulary and
        # avoiding the padding id (RoCBert's input_shape_ids and
        # input_pronunciation_ids: shape_vocab_size, pronunciation_vocab_size);
        # left out, the model embeds the padding id 0 for them
        m = re.fullmatch(r"input_(\w+)_ids", param)
        vocab = getattr(cfg, f"{m.group(1)}_vocab_size", None) if m else None
        if param in inputs or not _int(vocab) or vocab < 2:
            continue
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        pad = getattr(cfg, "pad_token_id", None)
        if _int(pad) and 0 <= pad < vocab:
            ids[ids == pad] = (pad + 1) % vocab
        inputs[param] = ids
    if getattr(cfg, "is_encoder_decoder", False) and "decoder_input_ids" in sig:
        inputs["decoder_input_ids"] = _ids(torch, gen, cfg, batch, seq)
    values = inputs.get("input_values")
    if "decoder_input_values" in sig and values is not None:
        # an encoder-decoder over values both sides (SpeechT5's bare model:
        # its decoder without a prenet has no input of its own otherwise)
        inputs["decoder_input_values"] = torch.randn(values.shape, generator=gen)
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
    # a default config transformers itself cannot run (HC's check, from the
    # config alone): said so, unless overrides may have fixed it
    problem = default_config_problem(model_type, cfg)
    if problem is not None and not overrides:
        raise _unbuildable(problem)
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
    finite32 = _finite_output(model, inputs)
    if not finite32 or not _finite_in_float64(model, inputs):
        sdpa = _default_attention(cfg, seed, inputs)
        if sdpa is not None:
            where = "float64" if finite32 else "float32"
            # said in every check's notes (gradcheck.models reads it)
            sdpa.gradcheck_build_note = (
                f"built with {sdpa.config._attn_implementation} attention: with "
                f"eager attention the model's output is not finite in {where} at "
                "these weights and inputs (the model's own eager code, e.g. a "
                "fully masked row's mask overflowing in a float32 softmax)"
            )
            model = sdpa
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


def _finite_in_float64(model: Any, inputs: dict[str, Any]) -> bool:
    """Whether a float64 copy's first floating output is finite too (True
    where the float64 forward raises: its check says why)."""
    import torch

    twin = copy.deepcopy(model).double()
    wide = {
        k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
        for k, v in inputs.items()
    }
    try:
        return _finite_output(twin, wide)
    except Exception:
        return True


def _default_attention(cfg: Any, seed: int, inputs: dict[str, Any]) -> Any:
    """The model built again with its default attention when that one's output
    is finite where eager attention's is not, else None. NeMo's streaming
    Conformer (nemotron3_5_asr, nemotron_asr_streaming) masks with
    ``attention_mask.logical_not()``, right for the boolean mask SDPA gets and
    wrong for eager's additive float mask (0 where allowed): every score is
    -inf, softmax 0/0, the output NaN at any weights. And where eager's output
    is finite in float32 but not in float64 (BLT: its eager softmax runs in
    float32, ``softmax(..., dtype=torch.float32)``, so a fully masked
    cross-attention row, float64's finfo.min, becomes -inf and NaN; in float32
    finfo.min stays finite and the row uniform): SDPA when it is finite in
    both, so that both dtypes check one model. A model NaN with both stays as
    built: its check reports the NaN."""
    import torch

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(cfg, eager=False)
            _draw_zero_tensors(model)
        model.eval()
        if model.config._attn_implementation == "eager":
            return None
        if _finite_output(model, inputs) and _finite_in_float64(model, inputs):
            return model
        return None
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
    out += _stream_candidates(out, model.config) + _width_candidates(out, model.config)
    extended = [_with_required(c, sig, model.config, seed) for c in out]
    changed = [
        c
        for c, old in zip(extended, out, strict=True)
        if c.keys() != old.keys() or any(c[k] is not old[k] for k in c)
    ]
    return out + changed


def _stream_candidates(cands: list[dict[str, Any]], cfg: Any) -> list[dict[str, Any]]:
    """Decoder ids per codebook, (batch, sequence, channels), for a decoder
    config with ``num_channels``/``num_codebooks`` (Dia). Token ids as parallel
    streams, (batch, sequence, 1 + codebooks): a text
    token and one token per audio codebook at each step, as a config with
    ``num_codebooks`` and ``codebook_vocab_size`` may take them (Kyutai
    speech-to-text sums the streams' embeddings): the text column below the
    vocabulary, each codebook column below ``codebook_vocab_size``. Tried after
    the plain candidates (MusicGen takes its codebooks otherwise)."""
    torch = _torch()
    out = []
    dec = _sub(cfg, "decoder_config")
    channels = _first_int(getattr(dec, "num_channels", None)) or _first_int(
        getattr(dec, "num_codebooks", None)
    )
    vocab = _first_int(getattr(dec, "vocab_size", None))
    if dec is not cfg and channels and vocab:
        # a decoder over codebooks (Dia: decoder_input_ids (batch, sequence,
        # channels), each below the decoder's vocabulary)
        for cand in cands:
            ids = cand.get("decoder_input_ids")
            if ids is not None and ids.dim() == 2:
                shape = (*ids.shape, channels)
                codes = torch.randint(0, vocab, shape, generator=_gen(1))
                pad = getattr(dec, "pad_token_id", None)
                if _int(pad) and 0 <= pad < vocab:  # not the padding id
                    codes[codes == pad] = (pad + 1) % vocab
                out.append({**cand, "decoder_input_ids": codes})
    books = _first_int(getattr(cfg, "num_codebooks", None))
    size = _first_int(getattr(cfg, "codebook_vocab_size", None))
    if not (books and size):
        return out
    for cand in cands:
        ids = cand.get(TEXT)
        if ids is None or ids.dim() != 2:
            continue
        codes = torch.randint(0, size, (*ids.shape, books), generator=_gen(1))
        out.append({**cand, TEXT: torch.cat([ids.unsqueeze(-1), codes], dim=-1)})
    return out


def _width_candidates(cands: list[dict[str, Any]], cfg: Any) -> list[dict[str, Any]]:
    """Audio features of the other widths the audio config implies, in both
    layouts, tried after the plain candidates: frames stacked k at a time
    (``input_size`` a multiple of the mel bins: Fun-ASR-Nano, 7 x 80 = 560),
    or the width a subsampler's first stage assumes when the config names no
    mel bins (Gemma-4 audio: ``subsampling_conv_channels[0]``)."""
    torch = _torch()
    aud = _sub(cfg, "audio_config", "encoder_config", "asr_config")
    mels = _first_int(getattr(aud, "num_mel_bins", None))
    widths = []
    stacked = getattr(aud, "input_size", None)
    if _int(stacked) and mels and stacked > mels and stacked % mels == 0:
        widths.append(stacked)
    named = any(
        _int(getattr(aud, k, None))
        for k in ("num_mel_bins", "feature_size", "input_feat_per_channel")
    )
    first = _first_int(getattr(aud, "subsampling_conv_channels", None))
    if first and not named:
        widths.append(first)
    out = []
    for cand in cands:
        feats = cand.get("input_features")
        if feats is None or feats.dim() != 3:
            continue
        b, frames = feats.shape[0], 64
        for w in widths:
            for shape in ((b, frames, w), (b, w, frames)):
                x = torch.randn(shape, generator=_gen(2))
                out.append({**cand, "input_features": x})
    return out


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
    latent = getattr(cfg, "latent_query_num", None)
    if "image_embeds_position_mask" in sig and ids is not None and _int(latent):
        # Kosmos-2: the image's latent queries replace the embeddings of the
        # tokens this mask marks: one per query, right after the first token
        b = ids.shape[0]
        fill = _ids(torch, gen, cfg, b, latent)
        out[TEXT] = torch.cat([ids[:, :1], fill, ids[:, 1:]], dim=1)
        mask = torch.zeros(out[TEXT].shape, dtype=torch.long)
        mask[:, 1 : 1 + latent] = 1
        out["image_embeds_position_mask"] = mask
        if "attention_mask" in cand:
            out["attention_mask"] = torch.ones(out[TEXT].shape, dtype=torch.long)
        ids = out[TEXT]
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
    if pixels is not None and pixels.dim() == 4 and any(k in sig for k in _PACKED):
        out.update(_packed_patches(pixels, sig, cfg))
    feats = cand.get("input_features")
    if "input_features_mask" in sig and feats is not None and feats.dim() == 3:
        aud = _sub(cfg, "audio_config", "encoder_config")
        mels = getattr(aud, "num_mel_bins", None) or getattr(aud, "feature_size", None)
        frames = feats.shape[2] if feats.shape[1] == mels else feats.shape[1]
        out["input_features_mask"] = torch.ones(
            feats.shape[0], frames, dtype=torch.long
        )
    if "action_embeds" in sig and ids is not None and pixels is not None:
        out.update(_action_expert_inputs(out, cfg, gen))
    return out


def _action_expert_inputs(cand: dict[str, Any], cfg: Any, gen: Any) -> dict[str, Any]:
    """A vision-language-action policy's bare model (PI0.5): its action
    expert takes the embedded noisy action chunk, (batch, chunk_size, the
    expert's width), and the embedded flow-matching time, (batch, width),
    that the policy (PI05ForConditionalGeneration) computes from actions and
    a timestep; the vision-language prefix takes images per camera, (batch,
    cameras, channels, height, width) with a camera mask, each camera's image
    tokens in front of the text (one per patch). One camera."""
    torch = _torch()
    dit = _sub(cfg, "dit_config")
    vlm = _sub(cfg, "vlm_config")
    vis = _sub(vlm, "vision_config")
    width, chunk = getattr(dit, "hidden_size", None), getattr(cfg, "chunk_size", None)
    size, patch = getattr(vis, "image_size", None), getattr(vis, "patch_size", None)
    image = getattr(vlm, "image_token_id", None)
    if not all(_int(x) for x in (width, chunk, size, patch, image)):
        return {}
    ids, pixels = cand[TEXT], cand["pixel_values"]
    b = ids.shape[0]
    text = torch.where(ids == image, (image + 1) % _vocab(vlm)[0], ids)
    marks = torch.full((b, (size // patch) ** 2), image, dtype=ids.dtype)
    ids = torch.cat([marks, text], dim=1)
    out = {
        TEXT: ids,
        "pixel_values": pixels.unsqueeze(1) if pixels.dim() == 4 else pixels,
        "pixel_attention_mask": torch.ones(b, 1, dtype=torch.bool),
        "action_embeds": torch.randn(b, chunk, width, generator=gen),
        "timestep_embeds": torch.randn(b, width, generator=gen),
    }
    if "attention_mask" in cand:
        out["attention_mask"] = torch.ones(ids.shape, dtype=torch.long)
    return out


#: the per-image patch layouts that NaViT-style towers take with flattened
#: patches (SigLIP-2's spatial shapes and patch mask, Gemma-4's patch
#: positions) or with the image's patch grid (MiniCPM-V's target sizes)
_PACKED = ("spatial_shapes", "pixel_position_ids", "target_sizes")


def _packed_patches(pixels: Any, sig: Mapping[str, Any], cfg: Any) -> dict[str, Any]:
    """The pixel values as such a tower takes them, from (batch, channels,
    height, width): a grid of g x g patches per image (g: height / patch, rounded
    down to a multiple of the pooling kernel or window, at least one of it),
    flattened to (batch, g*g, channels x patch x patch) with every patch valid
    (``pixel_attention_mask``) and the grid (``spatial_shapes``) or each
    patch's (x, y) (``pixel_position_ids``); a tower that embeds the patches
    itself (``target_sizes``) gets them as one strip, and each image's grid."""
    torch = _torch()
    vis = _sub(cfg, "vision_config")
    patch = _first_int(getattr(vis, "patch_size", None)) or 16
    unit = max(
        _first_int(getattr(vis, "pooling_kernel_size", None)) or 1,
        _first_int(getattr(vis, "window_kernel_size", None)) or 1,
    )
    b, c, h, _ = pixels.shape
    g = max(unit, (h // patch) // unit * unit)
    out: dict[str, Any] = {}
    if "target_sizes" in sig:
        # MiniCPM-V packs every image's patches into one strip of patches,
        # (1, channels, patch, patches x patch), as its processor does
        strip = torch.randn(1, c, patch, b * g * g * patch, generator=_gen(0))
        out["pixel_values"] = strip
        out["target_sizes"] = torch.tensor([[g, g]] * b, dtype=torch.int32)
        return out
    out["pixel_values"] = torch.randn(b, g * g, c * patch * patch, generator=_gen(0))
    if "pixel_attention_mask" in sig:
        out["pixel_attention_mask"] = torch.ones(b, g * g, dtype=torch.long)
    if "spatial_shapes" in sig:
        out["spatial_shapes"] = torch.tensor([[g, g]] * b, dtype=torch.long)
    if "pixel_position_ids" in sig:
        ys, xs = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
        xy = torch.stack([xs.flatten(), ys.flatten()], dim=-1)
        out["pixel_position_ids"] = xy.unsqueeze(0).expand(b, -1, -1).contiguous()
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
    # the same numbers go by other names in MUSE Glimmer/Spark (patch_temporal,
    # merge_size)
    temporal = _first_int(getattr(cfg, "temporal_patch_size", None)) or _first_int(
        getattr(cfg, "patch_temporal", None)
    )
    temporal = temporal or 1
    merge = (
        _first_int(getattr(cfg, "spatial_merge_size", None))
        or _first_int(getattr(cfg, "merge_kernel_size", None))
        or _first_int(getattr(cfg, "merge_size", None))
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
    if "merge_sizes" in sig:  # VideoLLaMA-3: each image's merge size
        sizes = torch.full((images,), merge, dtype=torch.long)
        out = [{**c, "merge_sizes": sizes} for c in out]
    if merge > 1:  # Inkling-2: one (patch x m, patch x m, channels) per token,
        # the grid counted in merged tokens
        tokens = torch.tensor([[1, side // merge, side // merge]] * images)
        merged = torch.randn(
            n // merge**2, size * merge, size * merge, channels, generator=gen
        )
        out.append({name: merged, key: tokens})
    return out


def _working_inputs(model: Any, seed: int) -> dict[str, Any]:
    failures: list[Exception] = []
    tried = _candidates(model, seed)
    found = _first_working(model, tried, failures)
    if found is None:
        # the same inputs for a batch of one: a model whose code only runs
        # one sample at a time (TVP views its column position embeddings as
        # (batch_size, 1, width, hidden) from a (width, hidden) table). Their
        # failures are not the reason given: the batch of two's are
        found = _first_working(model, [_single(c) for c in tried], [])
    if found is not None:
        return found
    # the reason to give: the first that is not about an input left out (the
    # candidate with every input kind got further)
    reason = next((e for e in failures if not _missing_input(e)), failures[0])
    names = _required_names(str(reason))
    if names and _missing_input(reason):
        # only inputs left out: ones gradcheck has no rule to draw
        raise _unbuildable(
            f"{type(model).__name__}.forward requires {', '.join(map(repr, names))}, "
            "which gradcheck cannot infer from the config or the forward's "
            "documentation (it draws token ids, pixel values, audio values and "
            "the inputs it has rules for); pass the inputs yourself: "
            f"gradcheck.check_model(model, inputs={{...}}) ({_why(reason)})"
        ) from reason
    raise reason


def _first_working(
    model: Any, tried: list[dict[str, Any]], failures: list[Exception]
) -> dict[str, Any] | None:
    """The first of ``tried`` (each as given, then up to _REPAIRS times as the
    model's last error asks: a width, then a length, ...) that the model runs
    on, or None; every error is appended to ``failures``."""
    import torch

    for cand in tried:
        attempt: dict[str, Any] | None = cand
        for _ in range(1 + _REPAIRS):
            if attempt is None:
                break
            try:
                with torch.no_grad():
                    model(**attempt)
            except Exception as exc:
                failures.append(exc)
                attempt = _repaired(attempt, exc, model)
                continue
            return attempt
    return None


def _single(cand: dict[str, Any]) -> dict[str, Any]:
    """``cand`` with its first sample only: every tensor whose first axis is
    the batch (the token ids' or pixel values' first size) cut to one."""
    torch = _torch()
    lead = next((v for v in cand.values() if torch.is_tensor(v) and v.dim() >= 2), None)
    if lead is None:
        return cand
    batch = lead.shape[0]
    return {
        k: v[:1] if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == batch else v
        for k, v in cand.items()
    }


_MATMUL = re.compile(
    r"mat1 and mat2 shapes cannot be multiplied \((\d+)x(\d+) and (\d+)x(\d+)\)"
)
_MULTIPLE = re.compile(r"not a multiple of (\d+)")
#: "... to be a multiple of `n_window * 2` (100), but got 64" (Qwen3-ASR)
_MULTIPLE_GOT = re.compile(r"multiple of [^,]*?\(?(\d+)\)?, but got (\d+)")
#: "Given input size: (384x2x2). Calculated output size: (384x0x1). Output
#: size is too small": a pooling window larger than the map the image left
_POOL_TOO_SMALL = re.compile(
    r"Given input size: \(([\dx]+)\)\. Calculated output size: \(([\dx]+)\)\. "
    r"Output size is too small"
)
_CAT_SIZES = re.compile(
    r"Sizes of tensors must match except in dimension \d+\. Expected size (\d+) "
    r"but got size (\d+)"
)
_NORM_WIDTH = re.compile(
    r"normalized_shape=\[(\d+)\], expected input with shape \[\*, [\d, ]+\], "
    r"but got input of size\s*\[([\d, ]+)\]"
)
_RANK = re.compile(
    r"Dimension out of range \(expected to be in range of \[-(\d+), \d+\], but got"
)
#: "Input must be a 5D tensor of shape (batch_size, 2, num_channels, ...)":
#: image pairs (EfficientLoFTR, LightGlue, SuperGlue-like matchers)
_IMAGE_SET = re.compile(r"5D tensor of shape \(batch_size, (\d+), num_channels")
#: how many times one candidate is repaired, one error after another
_REPAIRS = 3


def _repaired(
    cand: dict[str, Any], exc: Exception, model: Any = None
) -> dict[str, Any] | None:
    """``cand`` changed as the model's own error asks, or None:

    - audio values whose length must be a multiple of N (rounded up to one);
      audio features whose time axis must be (Qwen3-ASR: a multiple of its
      window, 100 frames) or the frame count of a branch they are joined to
      (X-Codec 2), their frame mask with them;
    - audio features whose feature width the first projection refuses (Granite
      Speech 5 stacks delta features: 4 x the mel bins), given the width it
      takes; likewise the width a first LayerNorm takes (Wav2Vec2-BERT's
      ``feature_projection_input_dim``, NeuCodec/XCodec2's semantic encoder):
      audio values that meet it are a sequence of frames of that width
      (SpeechT5's bare encoder-decoder takes hidden states, its decoder too);
    - an input one dimension short of the model's indexing: audio features as
      (batch, 1, frames, mel bins) (CLAP's one-channel spectrogram image),
      audio values as a spectrogram (batch, frames, mel bins) of the config's
      ``max_length`` and ``num_mel_bins`` (Audio Spectrogram Transformer);
    - pixel values as a set of N images per sample when the model says so
      (image matchers: pairs);
    - a tensor input the forward requires (or says cannot be None) drawn as
      :func:`_required_input` makes it;
    - the channels a first convolution takes (a latent decoder: its latent
      channels, 8 latent frames instead of audio samples)."""
    torch = _torch()
    text = str(exc)
    cfg = getattr(model, "config", None)
    named = _required_names(text)
    if named and model is not None:
        out = dict(cand)
        for name in named:
            if name not in out:
                x = _required_input(model, name, out)
                if x is None:
                    return None
                out[name] = x
        if "hidden_states" in named:  # it took the audio's place
            for key in AUDIO:
                out.pop(key, None)
        return out if out.keys() != cand.keys() else None
    m = _POOL_TOO_SMALL.search(text)
    image = cand.get("pixel_values")
    if m and image is not None and image.dim() == 4:
        return _grow_image(cand, m.group(1), m.group(2))
    m = _IMAGE_SIZE.search(text)
    if m:
        return _to_image_size(cand, *(int(g) for g in m.groups()))
    m = _CONV_CHANNELS.search(text)
    if m:
        return _to_channels(cand, int(m.group(1)), m.group(2), int(m.group(3)))
    values = cand.get("input_values")
    feats = cand.get("input_features")
    pixels = cand.get("pixel_values")
    m = _MULTIPLE.search(text)
    if m and values is not None and 1 < int(m.group(1)) <= 100_000:
        per = int(m.group(1))
        n = -(-values.shape[-1] // per) * per
        shape = (*values.shape[:-1], n)
        return {**cand, "input_values": torch.randn(shape, generator=_gen(0))}
    m = _MULTIPLE_GOT.search(text)
    if m and feats is not None and 1 < int(m.group(1)) <= 10_000:
        return _frames_to_multiple(cand, int(m.group(2)), int(m.group(1)))
    m = _CAT_SIZES.search(text)
    if m and feats is not None and 0 < int(m.group(2)) <= 10_000:
        # two audio branches joined frame by frame (X-Codec 2: the semantic
        # features' frames next to the acoustic encoder's, one per 320
        # samples): the features take the frame count the other branch has
        return _frames_to_multiple(cand, int(m.group(1)), 1, exact=int(m.group(2)))
    m = _MATMUL.search(text)
    if m and feats is not None and feats.dim() == 3:
        got, want = int(m.group(2)), int(m.group(3))
        if got == feats.shape[-1] and got != want and want <= 4096:
            shape = (*feats.shape[:-1], want)
            return {**cand, "input_features": torch.randn(shape, generator=_gen(0))}
    m = _NORM_WIDTH.search(text)
    if m and int(m.group(1)) <= 4096:
        return _to_width(cand, int(m.group(1)), m.group(2))
    m = _RANK.search(text)
    if m:
        rank = int(m.group(1))
        if feats is not None and feats.dim() == rank == 3:
            return {**cand, "input_features": feats.unsqueeze(1)}
        # AST indexes its values after unsqueezing them: the error's rank is 3
        if values is not None and values.dim() == 2 and rank in (2, 3):
            aud = _sub(cfg, "audio_config", "encoder_config")
            frames = _first_int(getattr(aud, "max_length", None)) or 64
            mels = _first_int(getattr(aud, "num_mel_bins", None)) or 80
            shape = (values.shape[0], frames, mels)
            return {**cand, "input_values": torch.randn(shape, generator=_gen(0))}
    m = _IMAGE_SET.search(text)
    if m and pixels is not None and pixels.dim() in (4, 5):
        n = int(m.group(1))
        b, c, h, w = pixels.shape[0], *pixels.shape[-3:]
        pairs = torch.randn(b, n, c, h, w, generator=_gen(0))
        return {**cand, "pixel_values": pairs}
    return None


_MISSING = re.compile(r"missing \d+ required positional arguments?: (.+)$", re.M)
_NOT_NONE = re.compile(r"`(\w+)` cannot be `?None`?|(\w+) must be given for")
#: "Input image size (128*64) doesn't match model (64*64)." (ViT-like
#: patch embeddings; SegGPT stacks the prompt over the image: 2 x the height)
_IMAGE_SIZE = re.compile(
    r"Input image size \((\d+)\*(\d+)\) doesn't match model \((\d+)\*(\d+)\)"
)
_CONV_CHANNELS = re.compile(
    r"weight of size \[\d+, (\d+), [\d, ]+\], expected input\[([\d, ]+)\] to "
    r"have \d+ channels, but got (\d+) channels"
)


def _required_names(text: str) -> list[str]:
    """The arguments an error says the forward requires: Python's "missing N
    required positional arguments: 'a' and 'b'", transformers' "`a` cannot be
    `None`"."""
    m = _MISSING.search(text)
    if m:
        return re.findall(r"'(\w+)'", m.group(1))
    return [a or b for a, b in _NOT_NONE.findall(text)]


#: the shape a forward's docstring gives an argument: "`x` ... of shape `(a, b)`"
_DOC_SHAPE = r"{name} \(`[^`]*`\s+of shape `\(([\w, ]+)\)`"


def _required_input(model: Any, name: str, cand: dict[str, Any]) -> Any:
    """A tensor for the forward argument ``name`` that the model requires, or
    None when there is no rule for it:

    - ``hidden_states`` in place of audio values or features (VibeVoice's
      acoustic tokenizer encoder and decoder: its forward names the waveform
      so): the audio, (batch, 1, samples) for values;
    - otherwise the shape the forward's docstring gives it, each named axis
      from what it names: ``batch_size`` the candidate's batch, a config
      attribute of that name (LXMERT's ``visual_feat_dim``,
      ``visual_pos_dim``; ``hidden_size``), ``sequence_length`` 8 (4 for a
      mask's partner), ``num_channels``/``height``/``width`` those of the pixel
      values (SegGPT's prompt image and mask), any other count 8. Float
      values, except ``*mask*`` arguments (all ones) and LongTensors (skipped:
      their values are a meaning, not a draw). BLIP-2's bare Q-Former
      (``query_embeds``, (batch, sequence, hidden)) and LXMERT's visual
      features and box positions come from here."""
    torch = _torch()
    gen = _gen(len(cand) + 7)
    if name == "hidden_states":
        audio = next((cand[k] for k in AUDIO if k in cand), None)
        if audio is not None:
            return audio.unsqueeze(1) if audio.dim() == 2 else audio
    doc = getattr(model.forward, "__doc__", None) or ""
    m = re.search(_DOC_SHAPE.format(name=re.escape(name)), doc)
    if m is None:
        return None
    head = doc[m.start() : m.end()]
    if "LongTensor" in head and "mask" not in name:
        return None
    cfg = model.config
    first = next((v for v in cand.values() if _torch().is_tensor(v)), None)
    batch = first.shape[0] if first is not None else 2
    pixels = cand.get("pixel_values")
    picture = {}
    if pixels is not None and pixels.dim() >= 4:
        c, h, w = pixels.shape[-3:]
        picture = {"num_channels": c, "height": h, "width": w}
    shape, prefix = [], name.split("_")[0]
    for axis in (a.strip() for a in m.group(1).split(",")):
        if axis == "batch_size":
            shape.append(batch)
        elif axis in picture:
            shape.append(int(picture[axis]))
        elif _int(getattr(cfg, f"{prefix}_{axis}", None)):
            # encoder_hidden_states' hidden_size: the config's
            # encoder_hidden_size (BLIP-2's Q-Former: the vision tower's width)
            shape.append(getattr(cfg, f"{prefix}_{axis}"))
        elif _int(getattr(cfg, axis, None)):
            shape.append(getattr(cfg, axis))
        else:
            shape.append(8)
    if "mask" in name and not picture:
        return torch.ones(shape, dtype=torch.long)
    return torch.randn(shape, generator=gen)


def _to_channels(
    cand: dict[str, Any], channels: int, got: str, had: int
) -> dict[str, Any] | None:
    """The floating input of the shape a convolution refused given the channels
    it takes: audio values (batch, 1, samples) read as a latent sequence (a
    latent decoder) become (batch, channels, 8 frames)."""
    torch = _torch()
    shape = tuple(int(x) for x in got.split(","))
    for key, x in cand.items():
        if not (torch.is_tensor(x) and x.is_floating_point()):
            continue
        if x.dim() != len(shape) or x.shape[1] != had or channels > 4096:
            continue
        if x.shape[0] != shape[0]:  # its length may be padded inside
            continue
        new = list(x.shape)
        new[1] = channels
        if had == 1 and x.dim() == 3:  # samples -> a few latent frames
            new[2] = 8
        return {**cand, key: torch.randn(new, generator=_gen(0))}
    return None


def _grow_image(cand: dict[str, Any], got: str, calc: str) -> dict[str, Any] | None:
    """The pixel values twice as high (wide) where a pooling window did not fit
    the map left of the image's height (width): a text-line recogniser's
    backbone divides the height by 32 and pools 3 rows (PP-OCRv5 mobile rec:
    64 -> 2 rows, 128 -> 4)."""
    torch = _torch()
    pixels = cand["pixel_values"]
    sizes = [int(x) for x in got.split("x")][-2:]
    outs = [int(x) for x in calc.split("x")][-2:]
    if len(sizes) != 2 or len(outs) != 2:
        return None
    h, w = pixels.shape[-2:]
    new_h = 2 * h if outs[0] < 1 else h
    new_w = 2 * w if outs[1] < 1 else w
    if (new_h, new_w) == (h, w) or max(new_h, new_w) > 1024:
        return None
    shape = (*pixels.shape[:-2], new_h, new_w)
    return {**cand, "pixel_values": torch.randn(shape, generator=_gen(0))}


def _to_image_size(
    cand: dict[str, Any], got_h: int, got_w: int, want_h: int, want_w: int
) -> dict[str, Any] | None:
    """Every image-shaped input (``*pixel_values``, ``*masks`` of the pixel
    values' shape) scaled so the image the model assembles from them is the
    size it takes: SegGPT stacks its prompt over the image (twice the
    height), so each is half the model's height."""
    torch = _torch()
    pixels = cand.get("pixel_values")
    if pixels is None or pixels.dim() != 4:
        return None
    h, w = pixels.shape[-2:]
    if got_h % h or got_w % w:
        return None
    new_h, new_w = want_h * h // got_h, want_w * w // got_w
    if new_h < 1 or new_w < 1 or (new_h, new_w) == (h, w):
        return None
    out, gen = dict(cand), _gen(0)
    for key, x in cand.items():
        if torch.is_tensor(x) and x.shape == pixels.shape:
            out[key] = torch.randn(*x.shape[:-2], new_h, new_w, generator=gen)
    return out


def _frames_to_multiple(
    cand: dict[str, Any], got: int, per: int, exact: int | None = None
) -> dict[str, Any] | None:
    """The features' axis of length ``got`` (the last such: frames follow the
    mel bins in (batch, mel bins, frames)) rounded up to a multiple of ``per``
    (or set to ``exact``), a frame mask of that length with it."""
    torch = _torch()
    feats = cand["input_features"]
    axes = [i for i in range(1, feats.dim()) if feats.shape[i] == got]
    if not axes:
        return None
    n = exact if exact is not None else -(-got // per) * per
    shape = list(feats.shape)
    shape[axes[-1]] = n
    out = {**cand, "input_features": torch.randn(shape, generator=_gen(0))}
    for key in ("input_features_mask", "feature_attention_mask", "attention_mask"):
        mask = cand.get(key)
        if mask is not None and mask.dim() == 2 and mask.shape[1] == got:
            out[key] = torch.ones(mask.shape[0], n, dtype=mask.dtype)
    return out


def _to_width(cand: dict[str, Any], width: int, got: str) -> dict[str, Any] | None:
    """Every floating input of the shape a LayerNorm refused given ``width`` as
    its last axis: (batch, frames, width) for 3-D features, (batch, 8 frames,
    width) for a 2-D sequence of audio values."""
    torch = _torch()
    shape = tuple(int(x) for x in got.split(","))
    out, gen = dict(cand), _gen(0)
    for key, x in cand.items():
        if not (torch.is_tensor(x) and x.is_floating_point()):
            continue
        if tuple(x.shape) != shape or x.shape[-1] == width:
            continue
        new = (*x.shape[:-1], width) if x.dim() >= 3 else (x.shape[0], 8, width)
        out[key] = torch.randn(new, generator=gen)
    return out if any(out[k] is not cand[k] for k in cand) else None


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


def _drawable(annotation: Any) -> bool:
    """Whether a required argument so annotated is something gradcheck can
    draw: unannotated, a tensor (any ``torch.*Tensor``, optional or not), or a
    plain number."""
    if annotation is inspect.Parameter.empty or annotation in (int, float, bool):
        return True
    return "Tensor" in str(annotation)


def not_checkable(cls: Any) -> str | None:
    """Why a model class is outside ``hf:*`` by its nature (not by a failure of
    gradcheck's shrink or inputs), or None. Three rules, from the class alone:

    - it has no forward of its own (torch's unimplemented placeholder): Bark and
      GLM-Image's VQ-VAE are driven through ``generate``/``encode``/``decode``,
      so there is no model function of the inputs to check;
    - its forward returns only discrete tensors (:func:`_discrete_output`:
      WavTokenizer's encoder returns its codes, ``LongTensor``, and their
      mask): no floating output, so no gradient to check (the encoder's
      continuous part is checked inside the full codec, ``hf:wavtokenizer``);
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
    discrete = _discrete_output(forward)
    if discrete is not None:
        return (
            f"{cls.__name__}'s forward returns only discrete tensors ({discrete}): "
            "no floating output to differentiate (codes pick the nearest codebook "
            "entry: piecewise constant in the weights)"
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
        if not _drawable(p.annotation):
            kind = getattr(p.annotation, "__name__", str(p.annotation))
            return (
                f"{cls.__name__}.forward requires {name!r} (a {kind}: an object "
                "the processor's stateful API builds, not a tensor): not token ids, "
                "pixel values or audio values, and nothing gradcheck can draw"
            )
    return None


#: a field annotation that names an integer or boolean tensor
_DISCRETE = re.compile(r"\b(Long|Int|Bool)Tensor\b")


def _discrete_output(forward: Any) -> str | None:
    """``"<field>: <annotation>, ..."`` where ``forward``'s return annotation is
    an output class whose every field is an integer/boolean tensor or a mask
    (WavTokenizer's encoder: ``audio_codes: torch.LongTensor``,
    ``audio_codes_mask``), else None. From the annotations alone: nothing is
    built (an unresolvable annotation: None, the model is tried)."""
    import dataclasses
    import typing

    try:
        ret = typing.get_type_hints(forward).get("return")
    except Exception:
        return None
    for out in typing.get_args(ret) or (ret,):
        if not (isinstance(out, type) and dataclasses.is_dataclass(out)):
            continue
        fields = [f.name for f in dataclasses.fields(out)]
        notes: dict[str, Any] = {}
        for base in reversed(out.__mro__):
            notes.update(getattr(base, "__annotations__", {}))
        kinds = {k: str(notes.get(k, "")).replace("typing.", "") for k in fields}
        if fields and all(
            _DISCRETE.search(v) or k.endswith("_mask") for k, v in kinds.items()
        ):
            return ", ".join(f"{k}: {v}" for k, v in kinds.items())
    return None


def not_checkable_reason(model_type: str, spec: str) -> str | None:
    """The unbuildable message of a type outside ``hf:*`` by its nature (see
    :func:`not_checkable`), with the way to check it anyway; else None."""
    cls = _model_class(model_type)
    why = not_checkable(cls) if cls is not None else None
    if why is None:
        return None
    if "only discrete tensors" in why:  # own inputs would not give it one
        return (
            f"{spec} is not in hf:*: {why}. To check its continuous part, pass a "
            "submodule with a floating output and that submodule's inputs: "
            "gradcheck.check_model(model.encoder, inputs=(...))"
        )
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
