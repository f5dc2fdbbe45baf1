"""hf:<type> build: the shrink keeps each model's config consistent and the input
inference gives each model the inputs it needs (issue 17's unbuildable rows).

Each case builds the shrunk model and its inferred inputs, which runs one
forward pass (``_hf.build`` keeps the first candidate the model accepts): no
gradient check here (tests/test_hf_subset.py runs the full checks on CI's ten
types), so the file stays fast.
"""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from gradcheck.backends import _hf  # noqa: E402

#: model type -> {input name: its shape} (None: only that it is given)
CASES = {
    # video: (batch, frames, channels, height, width), frames shrunk to 4
    "videomae": {"pixel_values": (2, 4, 3, 64, 64)},
    "vivit": {"pixel_values": (2, 4, 3, 64, 64)},
    # a set of images per sample, and which tokens see them
    "idefics": {"pixel_values": (2, 1, 3, 64, 64), "image_attention_mask": (2, 8, 1)},
    # required extra inputs
    "bros": {"input_ids": (2, 8), "bbox": (2, 8, 4)},
    "xmod": {"input_ids": (2, 8), "lang_ids": (2,)},
    "align": {"input_ids": (2, 8), "pixel_values": (2, 3, 64, 64)},
    # 4 image tokens (one per Q-Former query) in front of the 8 text tokens
    "blip-2": {"input_ids": (2, 12), "pixel_values": (2, 3, 64, 64)},
    "instructblip": {"input_ids": (2, 12), "qformer_input_ids": (2, 8)},
    # vision towers fed flattened patches and their grid (no vocabulary)
    "qwen3_5_vision": {"hidden_states": (32, 3 * 2 * 16 * 16), "grid_thw": (2, 3)},
    "glm_ocr_vision": {"hidden_states": (32, 3 * 2 * 14 * 14), "grid_thw": (2, 3)},
    "exaone4_5_vision": {"hidden_states": None, "grid_thw": (2, 3)},
    "glm_image_vision": {"pixel_values": (8, 3 * 16 * 16), "grid_thw": (2, 3)},
    "kimi_k25_vision": {"pixel_values": (32, 3, 14, 14), "grid_thw": (2, 3)},
    "inkling2_vision": {"pixel_values": (8, 40, 40, 3), "image_grid_thw": (2, 3)},
    # audio: lengths, widths and masks the model asks for
    "muse_spark_audio": {"input_values": (2, 3 * 1920)},  # a multiple of 1920
    "granite_speech5_ctc": {"input_features": (2, 80, 4 * 80)},  # stacked deltas
    "audioflamingo3_encoder": {"input_features_mask": (2, 64)},
    "univnet": {"input_features": (2, 16, 100), "noise_sequence": (2, 16, 16)},
    "omniasr_audio": {"input_values": (2, 1, 4000)},
    "pocket_tts_audio_tokenizer_encoder": {"input_values": (2, 1, 4000)},
    # shrink consistency: MLA's rope fraction, Mamba-2 heads, BROS' box widths
    "mistral4": {"input_ids": (2, 8)},
    "dots3_note_text": {"input_ids": (2, 8)},
    "deepseek_v3": {"input_ids": (2, 8)},
    "bamba": {"input_ids": (2, 8)},
    "zamba2": {"input_ids": (2, 8)},
    "sapiens2": {"pixel_values": (2, 3, 64, 64)},  # per-layer key/value heads
    # HGNetV2 stage widths, encoder/decoder channels, 16 object queries
    "d_fine": {"pixel_values": (2, 3, 64, 64)},
    "rt_detr": {"pixel_values": (2, 3, 64, 64)},
    # Hiera stages, FPN channels and sizes (27M parameters before)
    "sam2": {"pixel_values": (2, 3, 64, 64)},
    # 3 stages of x2 (10.9M parameters before)
    "vibevoice_acoustic_tokenizer": {"input_values": (2, 1, 4000), "sample": None},
    "gemma3n_text": {"input_ids": (2, 8)},  # layers sharing keys/values
    # a main input name the forward does not take (transformers' default
    # "input_ids" on a vision tower): the signature's
    "idefics3_vision": {"pixel_values": (2, 3, 64, 64)},
    # token ids without a vocab_size: CANINE hashes code points
    "canine": {"input_ids": (2, 8)},
    # the width a first LayerNorm takes (feature_projection_input_dim)
    "wav2vec2-bert": {"input_features": (2, 80, 32)},
    # SpeechT5's bare encoder-decoder: hidden states both sides
    "speecht5": {"input_values": (2, 8, 32), "decoder_input_values": (2, 8, 32)},
    # frames a multiple of the window (100), the frame mask with them
    "qwen3_asr_encoder": {
        "input_features": (2, 128, 100),
        "input_features_mask": (2, 100),
    },
    # required tensors drawn from the forward's documented shapes
    "lxmert": {"visual_feats": (2, 8, 2048), "visual_pos": (2, 8, 4)},
    "blip_2_qformer": {"query_embeds": (2, 8, 32), "encoder_hidden_states": (2, 8, 32)},
    # prompt over image: each half the model's height
    "seggpt": {"pixel_values": (2, 3, 32, 64), "prompt_masks": (2, 3, 32, 64)},
    # the waveform by the name the forward gives it; a latent decoder's channels
    "vibevoice_acoustic_tokenizer_encoder": {"hidden_states": (2, 1, 4000)},
    "vibevoice_acoustic_tokenizer_decoder": {"hidden_states": (2, 32, 8)},
    # NaViT-style packed patches with their grid, mask or positions
    "siglip2_vision_model": {
        "pixel_values": (2, 16, 768),
        "pixel_attention_mask": (2, 16),
        "spatial_shapes": (2, 2),
    },
    "gemma4_vision": {"pixel_values": (2, 9, 768), "pixel_position_ids": (2, 9, 2)},
    "minicpmv4_7_vision": {"pixel_values": (1, 3, 16, 512), "target_sizes": (2, 2)},
    "video_llama_3_vision": {"grid_thw": (2, 3), "merge_sizes": (2,)},
    # patch sizes by other names (patch_temporal, merge_size): 3 x 2 x 14 x 14
    "muse_glimmer_vision": {"pixel_values": (32, 1176), "grid_thw": (2, 3)},
    # a text token and 32 codebook tokens per step
    "kyutai_speech_to_text": {"input_ids": (2, 8, 33)},
    # 7 stacked 80-bin frames; the mel width of a nested asr_config; a
    # subsampler's assumed width
    "fun_asr_nano_encoder": {"input_features": (2, 64, 560)},
    "nemotron3_5_transcribe_audio": {"input_features": (2, 64, 128)},
    "gemma4_audio": {"input_features": (2, 64, 128)},
    # the semantic features take the acoustic branch's frame count (4000 / 320)
    "xcodec2": {"input_values": (2, 1, 4000), "input_features": (2, 12, 32)},
    # encoder ids from the encoder's byte vocabulary, decoder ids per codebook
    "dia": {"input_ids": (2, 8), "decoder_input_ids": (2, 8, 9)},
    # TVP's code runs one sample at a time: the batch of one
    "tvp": {"input_ids": (1, 8), "pixel_values": (1, 3, 64, 64)},
    # a pooling window taller than the map a 64-px line leaves: twice as high
    "pp_ocrv5_mobile_rec": {"pixel_values": (2, 3, 128, 64)},
    # one marked token per latent query (64) after the first of the 8
    "kosmos-2": {"input_ids": (2, 72), "image_embeds_position_mask": (2, 72)},
}


#: shrunk types over the 2M parameters the other cases stay under
LIMITS = {"qwen3_asr_encoder": 5_000_000, "pp_ocrv5_mobile_rec": 5_000_000}


@pytest.mark.parametrize("model_type", list(CASES))
def test_model_builds_with_the_inputs_it_needs(model_type):
    limit = LIMITS.get(model_type, 2_000_000)
    model, inputs, n = _hf.build(model_type, {}, f"hf:{model_type}", 0, limit)
    assert n < limit
    for name, shape in CASES[model_type].items():
        assert name in inputs, sorted(inputs)
        if shape is not None:
            assert tuple(inputs[name].shape) == shape, (name, inputs[name].shape)


def test_a_vocoder_gets_its_noise_so_its_forward_is_a_function():
    model, inputs, _ = _hf.build("univnet", {}, "hf:univnet", 0, 2_000_000)
    with torch.no_grad():
        first, second = model(**inputs)[0], model(**inputs)[0]
    assert torch.equal(first, second)  # drawn inside forward, it would differ


def test_image_tokens_hold_the_query_outputs():
    model, inputs, _ = _hf.build("blip-2", {}, "hf:blip-2", 0, 2_000_000)
    image = model.config.image_token_id
    ids = inputs["input_ids"]
    assert (ids[:, :4] == image).all() and not (ids[:, 4:] == image).any()
    with torch.no_grad():  # the output depends on the pixels (not text only)
        a = model(**inputs).logits
        b = model(**{**inputs, "pixel_values": inputs["pixel_values"] + 1}).logits
    assert not torch.allclose(a, b)


def test_shrunk_mla_rotates_exactly_its_rope_part():
    cfg = _hf.shrink_config(_hf.load_config("mistral4"))
    rope = cfg.rope_parameters
    assert cfg.head_dim * rope["partial_rotary_factor"] == cfg.qk_rope_head_dim
    assert cfg.qk_head_dim == cfg.qk_nope_head_dim + cfg.qk_rope_head_dim


def test_staged_backbone_keeps_its_stages():
    # Mask2Former reads three levels of its Swin backbone: the stages stay,
    # one block deep each (they were cut to 2 and the stage names were not)
    model, inputs, _ = _hf.build("mask2former", {}, "hf:mask2former", 0, 5_000_000)
    swin = model.config.backbone_config
    assert len(swin.depths) == 4 and len(swin.stage_names) == 5
    assert max(swin.depths) == 1


def test_shared_kv_layers_stay_shared_after_the_shrink():
    cfg = _hf.shrink_config(_hf.load_config("gemma3n_text"))
    assert cfg.num_hidden_layers == 4 and cfg.num_kv_shared_layers == 2
    assert cfg.layer_types[:2] == cfg.layer_types[2:]  # one of each kind per part
    assert max(cfg.intermediate_size) <= 64  # per-layer widths capped too


def test_batch_norm_statistics_come_from_the_inputs():
    # at the initial statistics (mean 0, variance 1) ALIGN's narrow EfficientNet
    # fades its signal to ~1e-27: normalised, 0/0 in float32
    model, inputs, _ = _hf.build("align", {}, "hf:align", 0, 2_000_000)
    assert not model.training
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output
        out = model(**inputs)
    assert pooled.norm(dim=-1).min() > 0.1
    assert torch.isfinite(out.logits_per_image).all()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.momentum is not None for m in norms)  # restored
    assert any(
        not torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in norms
    )


def test_all_zero_weight_tensors_are_drawn_at_build():
    # BLIP-2's query tokens start at zero: identical tokens are a LayerNorm input
    # of zero variance (derivative 1e6 there; fd cannot resolve it)
    model, _, _ = _hf.build("blip-2", {}, "hf:blip-2", 0, 2_000_000)
    tokens = model.query_tokens
    assert tokens.std() > 0.005 and tokens.std() < 0.05
    again, _, _ = _hf.build("blip-2", {}, "hf:blip-2", 0, 2_000_000)
    assert torch.equal(again.query_tokens, tokens)  # from the build's seed


def test_eager_attention_nan_falls_back_to_the_default_attention():
    # NeMo's streaming Conformer masks with attention_mask.logical_not(): right
    # for SDPA's boolean mask, every score -inf with eager's additive one
    model, inputs, _ = _hf.build(
        "nemotron3_5_asr", {}, "hf:nemotron3_5_asr", 0, 2_000_000
    )
    assert model.config._attn_implementation != "eager"
    assert _hf._finite_output(model, inputs)
    llama, _, _ = _hf.build("llama", {}, "hf:llama", 0, 2_000_000)
    assert llama.config._attn_implementation == "eager"  # finite: stays eager


def test_recurrent_cycles_are_capped_and_fully_backpropagated():
    cfg = _hf.shrink_config(_hf.load_config("hrm_text"))
    assert (cfg.H_cycles, cfg.L_cycles, cfg.num_layers_per_stack) == (2, 2, 1)
    assert cfg.num_hidden_layers == 2 * (2 + 1)  # the slots the cache counts
    assert cfg.L_bp_cycles == [2, 2]  # no inner cycle under no_grad


def test_linear_attention_heads_lora_ranks_and_index_pools_are_shrunk():
    text = _hf.shrink_config(_hf.load_config("glm5_next")).get_text_config()
    assert text.linear_num_heads == 2  # was 64: a 3,072-channel conv per layer
    assert text.q_lora_rank <= 32 and text.kv_lora_rank <= 32
    assert text.index_kpool == 2  # pools of 16 tokens: none in 8


def test_a_config_attribute_transformers_forgot_is_said_to_be_its_bug():
    from gradcheck.models import UnbuildableError

    with pytest.raises(UnbuildableError) as info:
        _hf.build("qwen2_5_omni_thinker", {}, "hf:qwen2_5_omni_thinker", 0, 2_000_000)
    text = str(info.value)
    assert "cannot run qwen2_5_omni_thinker from its default config either" in text
    assert "reads config.vision_start_token_id, which Qwen2_5OmniThinkerConfig" in text


def test_build_leaves_the_global_rng_as_it_was():
    # batch-norm calibration runs a train-mode forward; zero tensors are drawn
    before = torch.get_rng_state()
    _hf.build("resnet", {}, "hf:resnet", 0, 2_000_000)
    _hf.build("blip-2", {}, "hf:blip-2", 0, 2_000_000)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_vae_is_checked_at_its_mean_not_a_draw():
    model, inputs, _ = _hf.build(
        "vibevoice_acoustic_tokenizer",
        {},
        "hf:vibevoice_acoustic_tokenizer",
        0,
        2_000_000,
    )
    assert inputs["sample"] is False  # forward's default draws mean + std x noise
    with torch.no_grad():
        first, second = model(**inputs)[0], model(**inputs)[0]
    assert torch.equal(first, second)


@pytest.mark.parametrize(
    ("model_type", "words"),
    [
        ("bark", "BarkModel has no forward of its own"),
        ("glm_image_vqmodel", "GlmImageVQVAE has no forward of its own"),
        ("sam2_video", "requires 'inference_session' (a Sam2VideoInferenceSession"),
        ("edgetam_video", "requires 'inference_session'"),
        ("sam3_tracker_video", "requires 'inference_session'"),
        ("sam3_video", "requires 'inference_session'"),
    ],
)
def test_a_type_outside_hf_star_says_why_and_what_to_do(model_type, words):
    from gradcheck.models import UnbuildableError

    with pytest.raises(UnbuildableError) as info:
        _hf.build(model_type, {}, f"hf:{model_type}", 0, 2_000_000)
    text = str(info.value)
    assert text.startswith(f"hf:{model_type} is not in hf:*: ")
    assert words in text and "gradcheck.check_model(model, inputs=" in text


def test_a_model_with_only_discrete_outputs_is_outside_hf_star():
    from gradcheck.models import UnbuildableError

    with pytest.raises(UnbuildableError) as info:
        _hf.build("wavtokenizer_encoder", {}, "hf:wavtokenizer_encoder", 0, 2_000_000)
    text = str(info.value)
    assert text.startswith(
        "hf:wavtokenizer_encoder is not in hf:*: WavTokenizerEncoderModel's forward "
        "returns only discrete tensors (audio_codes: torch.LongTensor"
    ), text
    assert "gradcheck.check_model(model.encoder, inputs=" in text
    found, left_out = _hf._scope()
    assert "wavtokenizer_encoder" in left_out and "wavtokenizer_encoder" not in found
    assert "wavtokenizer" in found  # the full codec's output is audio: checked


def test_excluded_types_are_listed_with_their_reason_and_not_expanded():
    found, left_out = _hf._scope()
    assert not set(found) & set(left_out)
    for t in ("bark", "glm_image_vqmodel", "sam2_video", "sam3_video"):
        assert t in left_out and t not in found
    assert "inference_session" in left_out["sam2_video"]
    for t in ("bert", "vit", "whisper", "canine", "seggpt"):
        assert t in found


@dataclasses.dataclass
class Codes:  # a codec encoder's output (module level: annotations resolve)
    codes: torch.LongTensor | None = None
    codes_mask: torch.Tensor | None = None


@dataclasses.dataclass
class CodesAndLatents(Codes):
    latents: torch.FloatTensor | None = None


class ReturnsCodes(torch.nn.Module):
    def forward(self, input_values: torch.Tensor) -> tuple | Codes:
        return Codes()


class ReturnsLatents(torch.nn.Module):
    def forward(self, input_values: torch.Tensor) -> tuple | CodesAndLatents:
        return CodesAndLatents()


def test_the_rules_that_leave_a_class_out():
    class NoForward(torch.nn.Module):
        pass

    class NeedsSession(torch.nn.Module):
        def forward(self, session: dict, pixel_values: torch.Tensor = None):
            return pixel_values

    class NeedsTensor(torch.nn.Module):
        def forward(self, pixel_values: torch.Tensor, hidden_states):
            return pixel_values

    assert "no forward of its own" in _hf.not_checkable(NoForward)
    assert "requires 'session' (a dict" in _hf.not_checkable(NeedsSession)
    assert _hf.not_checkable(NeedsTensor) is None  # tensors are drawn

    why = _hf.not_checkable(ReturnsCodes)
    assert why is not None and "returns only discrete tensors (codes: " in why
    assert _hf.not_checkable(ReturnsLatents) is None  # a floating field: checked


def test_repairs_follow_the_models_own_error():
    x = torch.zeros(2, 80, 64)
    norm = RuntimeError(
        "Given normalized_shape=[32], expected input with shape [*, 32], "
        "but got input of size[2, 80, 64]"
    )
    out = _hf._repaired({"input_features": x}, norm)
    assert out["input_features"].shape == (2, 80, 32)
    seq = _hf._repaired(
        {"input_values": torch.zeros(2, 4000)},
        RuntimeError(str(norm).replace("[2, 80, 64]", "[2, 4000]")),
    )
    assert seq["input_values"].shape == (2, 8, 32)
    window = ValueError(
        "expects `padded_feature_length` to be a multiple of `n_window * 2` "
        "(100), but got 64."
    )
    cand = {
        "input_features": torch.zeros(2, 128, 64),
        "input_features_mask": torch.ones(2, 64),
    }
    out = _hf._repaired(cand, window)
    assert out["input_features"].shape == (2, 128, 100)
    assert out["input_features_mask"].shape == (2, 100)
    pairs = ValueError(
        "Input must be a 5D tensor of shape (batch_size, 2, num_channels, height, width)"
    )
    out = _hf._repaired({"pixel_values": torch.zeros(2, 3, 64, 64)}, pairs)
    assert out["pixel_values"].shape == (2, 2, 3, 64, 64)
    rank = IndexError(
        "Dimension out of range (expected to be in range of [-3, 2], but got 3)"
    )
    out = _hf._repaired({"input_features": torch.zeros(2, 64, 64)}, rank)
    assert out["input_features"].shape == (2, 1, 64, 64)  # CLAP's spectrogram image
    size = ValueError("Input image size (128*64) doesn't match model (64*64).")
    cand = {
        "pixel_values": torch.zeros(2, 3, 64, 64),
        "prompt_masks": torch.zeros(2, 3, 64, 64),
    }
    out = _hf._repaired(cand, size)
    assert out["pixel_values"].shape == out["prompt_masks"].shape == (2, 3, 32, 64)
    # an error that names no input gives no repair (the reason stays the model's)
    assert _hf._repaired({"input_ids": torch.zeros(2, 8)}, RuntimeError("boom")) is None


def test_a_vocabulary_in_a_nested_config_gives_the_token_ids():
    cfg = _hf.load_config("fastspeech2_conformer_with_hifigan")
    vocab, sub = _hf._vocab(cfg)
    assert vocab == cfg.model_config.vocab_size and sub is cfg.model_config
    vocab, _ = _hf._vocab(_hf.load_config("canine"))
    assert vocab == _hf._CODE_POINTS


def test_kosmos2_image_queries_sit_where_the_mask_marks():
    _, inputs, _ = _hf.build("kosmos-2", {}, "hf:kosmos-2", 0, 2_000_000)
    mask = inputs["image_embeds_position_mask"]
    assert (mask.sum(dim=1) == 64).all()  # latent_query_num
    assert mask[:, 0].eq(0).all() and mask[:, 1:65].eq(1).all()
    assert inputs["attention_mask"].shape == inputs["input_ids"].shape


def test_dia_token_ids_stay_inside_each_sides_vocabulary():
    model, inputs, _ = _hf.build("dia", {}, "hf:dia", 0, 2_000_000)
    cfg = model.config
    assert inputs["input_ids"].max() < cfg.encoder_config.vocab_size
    codes = inputs["decoder_input_ids"]
    assert codes.max() < cfg.decoder_config.vocab_size
    assert not (codes == cfg.decoder_config.pad_token_id).any()


class _NeedsLatent(torch.nn.Module):
    """Requires a tensor gradcheck has no rule for (no documented shape)."""

    main_input_name = "input_ids"

    def __init__(self):
        super().__init__()
        from transformers import PretrainedConfig

        self.config = PretrainedConfig(vocab_size=10)

    def forward(self, input_ids, action_latent):
        return input_ids.float() + action_latent


def test_a_required_input_without_a_rule_is_named_with_the_fix():
    from gradcheck.models import UnbuildableError

    with pytest.raises(UnbuildableError) as info:
        _hf._working_inputs(_NeedsLatent(), 0)
    text = str(info.value)
    assert "_NeedsLatent.forward requires 'action_latent'" in text
    assert "gradcheck.check_model(model, inputs={...})" in text


def test_a_default_config_transformers_cannot_run_is_said_so():
    from gradcheck.models import UnbuildableError

    with pytest.raises(UnbuildableError) as info:
        _hf.build("pp_ocrv6_small_det", {}, "hf:pp_ocrv6_small_det", 0, 2_000_000)
    assert "from its default config either" in str(info.value)


def test_a_pool_too_big_for_the_image_grows_the_image_where_it_did_not_fit():
    small = RuntimeError(
        "Given input size: (384x2x2). Calculated output size: (384x0x1). "
        "Output size is too small"
    )
    out = _hf._repaired({"pixel_values": torch.zeros(2, 3, 64, 64)}, small)
    assert out["pixel_values"].shape == (2, 3, 128, 64)


def test_extra_id_streams_come_from_their_own_vocabularies():
    # RoCBert embeds shape and pronunciation ids beside the tokens; left out,
    # every position would embed the padding id 0
    model, inputs, _ = _hf.build("roc_bert", {}, "hf:roc_bert", 0, 2_000_000)
    cfg = model.config
    for name, vocab in (
        ("input_shape_ids", cfg.shape_vocab_size),
        ("input_pronunciation_ids", cfg.pronunciation_vocab_size),
    ):
        ids = inputs[name]
        assert ids.shape == inputs["input_ids"].shape
        assert ids.max() < vocab and not (ids == cfg.pad_token_id).any()


def test_an_action_expert_gets_its_action_chunk_and_cameras():
    model, inputs, _ = _hf.build("pi05", {}, "hf:pi05", 0, 2_000_000)
    cfg = model.config
    width = cfg.dit_config.hidden_size
    assert inputs["action_embeds"].shape == (2, cfg.chunk_size, width)
    assert inputs["timestep_embeds"].shape == (2, width)
    assert inputs["pixel_values"].dim() == 5  # (batch, cameras, c, h, w)
    assert inputs["pixel_attention_mask"].shape == (2, 1)
    vis = cfg.vlm_config.vision_config
    marks = (inputs["input_ids"] == cfg.vlm_config.image_token_id).sum(dim=1)
    assert marks.tolist() == [(vis.image_size // vis.patch_size) ** 2] * 2
    with torch.no_grad():
        out = model(**inputs)[0]
    assert out.shape == (2, cfg.chunk_size, width) and torch.isfinite(out).all()


def test_eager_attention_not_finite_in_float64_is_built_with_sdpa():
    # BLT's eager softmax runs in float32: float64's finfo.min on a fully masked
    # cross-attention row becomes -inf there, NaN; SDPA is finite in both dtypes
    model, inputs, _ = _hf.build("blt", {}, "hf:blt", 0, 2_000_000)
    assert model.config._attn_implementation == "sdpa"
    assert "not finite in float64" in model.gradcheck_build_note
    assert _hf._finite_in_float64(model, inputs)
    bert, bert_inputs, _ = _hf.build("bert", {}, "hf:bert", 0, 2_000_000)
    assert bert.config._attn_implementation == "eager"  # finite: left eager
    assert not hasattr(bert, "gradcheck_build_note")
