"""hf:<type> build: the shrink keeps each model's config consistent and the input
inference gives each model the inputs it needs (issue 17's unbuildable rows).

Each case builds the shrunk model and its inferred inputs, which runs one
forward pass (``_hf.build`` keeps the first candidate the model accepts): no
gradient check here (tests/test_hf_subset.py runs the full checks on CI's ten
types), so the file stays fast.
"""

from __future__ import annotations

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
}


@pytest.mark.parametrize("model_type", list(CASES))
def test_model_builds_with_the_inputs_it_needs(model_type):
    model, inputs, n = _hf.build(model_type, {}, f"hf:{model_type}", 0, 2_000_000)
    assert n < 2_000_000
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
