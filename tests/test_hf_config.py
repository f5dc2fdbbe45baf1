"""The hf:<type> shrink keeps the config attributes a model reads together
consistent (gradcheck/backends/_hf_config.py): one rule per family, each checked
on the config alone (load_config + shrink_config, nothing built), and a few
representative models built and run once (``slow`` where that takes > 5 s).

Each rule's test asserts the consistency the model's code needs, not the
numbers the shrink happens to choose, so a planted regression (the rule
removed) fails it: the defaults break every one of these."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from gradcheck.backends import _hf  # noqa: E402
from gradcheck.backends._hf_config import (  # noqa: E402
    TOKENS,
    _head_size,
    load_config,
    shrink_config,
)


def shrunk(model_type: str):
    return shrink_config(load_config(model_type))


# --- a rotary width fits the head (GPT-J, CodeGen: rotary_dim 64 of 256) -----


@pytest.mark.parametrize("model_type", ["gptj", "codegen"])
def test_rotary_dim_fits_the_shrunk_head(model_type):
    cfg = shrunk(model_type)
    head = cfg.n_embd // cfg.n_head
    assert 2 <= cfg.rotary_dim <= head
    assert cfg.rotary_dim % 2 == 0  # RoPE rotates pairs
    # a partial rotary stays partial (the default's 64 of 256: a quarter)
    assert cfg.rotary_dim < head


# --- group-limited routing: groups of >= 2 experts that divide them ----------


@pytest.mark.parametrize(
    ("model_type", "key"),
    [("axk1", "n_group"), ("bailing_hybrid", "num_expert_group"), ("beam", "n_group")],
)
def test_expert_groups_divide_the_kept_experts(model_type, key):
    cfg = shrunk(model_type)
    experts = next(
        getattr(cfg, k)
        for k in ("n_routed_experts", "num_experts", "num_local_experts")
        if isinstance(getattr(cfg, k, None), int)
    )
    groups = getattr(cfg, key)
    assert groups >= 1 and experts % groups == 0
    assert experts // groups >= 2  # each group scores its top 2
    assert 1 <= cfg.topk_group <= groups
    # the kept groups hold at least the experts each token picks
    assert cfg.topk_group * (experts // groups) >= cfg.num_experts_per_tok


@pytest.mark.parametrize("model_type", ["aria_text", "aria"])
def test_moe_num_experts_is_an_expert_count(model_type):
    # capped like the others, and what the build's eager-experts switch reads
    # (transformers' grouped_mm refuses float64 on CPU)
    from gradcheck.backends._hf import _has_experts

    cfg = shrunk(model_type)
    text = cfg.get_text_config()
    assert text.moe_num_experts <= 4
    assert _has_experts(cfg)


def test_a_single_group_is_left_alone():
    cfg = shrunk("glm4_moe")
    assert cfg.n_group == 1 and cfg.topk_group == 1


# --- HiFi-GAN vocoders: every upsampling stage keeps channels -----------------


@pytest.mark.parametrize(
    ("model_type", "path"),
    [("vits", ()), ("seamless_m4t", ()), ("fastspeech2_conformer_hifigan", ())],
)
def test_hifigan_stages_keep_channels(model_type, path):
    cfg = shrunk(model_type)
    for part in path:
        cfg = getattr(cfg, part)
    stages = len(cfg.upsample_rates)
    # channels halve per stage: the last one still >= 2 wide
    assert cfg.upsample_initial_channel // 2**stages >= 2
    assert all(r <= 2 for r in cfg.upsample_rates)
    assert len(cfg.upsample_kernel_sizes) == stages
    assert all(
        k >= r
        for k, r in zip(cfg.upsample_kernel_sizes, cfg.upsample_rates, strict=True)
    )


def test_vits_forward_is_its_mean_path():
    cfg = shrunk("vits")
    assert cfg.noise_scale == 0.0 and cfg.noise_scale_duration == 0.0


# --- every attention module keeps >= 1 head ------------------------------------


def test_bridgetower_vision_heads_are_64_wide():
    vision = shrunk("bridgetower").vision_config
    assert vision.hidden_size // 64 >= 1  # nn.MultiheadAttention(w, w // 64)


def test_head_size_reads_head_dim_or_width_over_heads():
    assert _head_size(shrunk("llama")) == 16
    assert _head_size(shrunk("gptj")) == 16


# --- widths a model reads together ---------------------------------------------


def test_layoutlmv3_box_parts_add_up_to_the_width():
    cfg = shrunk("layoutlmv3")
    assert 4 * cfg.coordinate_size + 2 * cfg.shape_size == cfg.hidden_size


def test_lilt_width_fits_boxes_and_the_layout_stream():
    cfg = shrunk("lilt")
    assert cfg.hidden_size % 6 == 0  # 6 box parts of width // 6
    head = cfg.hidden_size // cfg.num_attention_heads
    assert head % cfg.channel_shrink_ratio == 0  # layout heads: head / ratio


def test_mobilebert_bottleneck_is_its_true_width():
    cfg = shrunk("mobilebert")
    assert cfg.true_hidden_size == cfg.intra_bottleneck_size <= 32


def test_blt_derived_widths_follow_the_shrunk_ones():
    cfg = shrunk("blt")
    width = cfg.global_config.hidden_size
    assert cfg.encoder_config.hidden_size_global == width
    assert cfg.decoder_config.hidden_size_global == width
    cross = cfg.encoder_config.hidden_size * cfg.cross_attn_k
    assert cfg.global_config.encoder_cross_output_size == (
        None if cross == width else cross
    )


@pytest.mark.parametrize("model_type", ["sam", "sam_hq"])
def test_sam_prompt_grid_and_positional_width(model_type):
    cfg = shrunk(model_type)
    vision = cfg.vision_config
    grid = vision.image_size // vision.patch_size
    assert cfg.prompt_encoder_config.image_embedding_size == grid
    assert 2 * vision.num_pos_feats == vision.output_channels


def test_sam3_tracker_fpn_sizes_follow_the_grid():
    vision = shrunk("sam3_tracker").vision_config
    grid = vision.backbone_config.image_size // vision.backbone_config.patch_size
    expected = [[int(grid * s)] * 2 for s in vision.scale_factors]
    assert (
        vision.backbone_feature_sizes == expected[: len(vision.backbone_feature_sizes)]
    )


def test_efficientnet_top_norm_follows_its_top_conv():
    from transformers.models.efficientnet.modeling_efficientnet import round_filters

    cfg = shrunk("efficientnet")
    assert cfg.hidden_dim == round_filters(cfg, 1280)


@pytest.mark.parametrize(
    ("model_type", "key", "parts"),
    [
        ("encodec", "codebook_dim", ("",)),
        ("xcodec", "codebook_dim", ("acoustic_model_config", "semantic_model_config")),
        ("neucodec", "quantization_dim", ("", "semantic_model_config")),
        ("xcodec2", "quantization_dim", ("", "semantic_model_config")),
        ("vit", "pooler_output_size", ("",)),
    ],
)
def test_widths_derived_at_config_time_are_derived_again(model_type, key, parts):
    cfg = shrunk(model_type)
    widths = [(getattr(cfg, p) if p else cfg).hidden_size for p in parts]
    assert getattr(cfg, key) == sum(widths)


def test_clap_audio_width_is_its_last_stage():
    audio = shrunk("clap").audio_config
    last = audio.patch_embeds_hidden_size * 2 ** (len(audio.depths) - 1)
    assert audio.hidden_size == last
    assert audio.patch_embeds_hidden_size % 2 == 0  # 2 heads in the first stage


def test_tvp_prompt_frame_fits_the_shrunk_image():
    cfg = shrunk("tvp")
    assert cfg.max_img_size <= 64
    assert cfg.max_img_size - 2 * cfg.visual_prompt_size > 0


@pytest.mark.parametrize("model_type", ["neucodec", "xcodec2", "dac"])
def test_doubling_codec_encoder_ends_narrow(model_type):
    cfg = shrunk(model_type)
    last = cfg.encoder_hidden_size * 2 ** len(cfg.downsampling_ratios)
    assert 2 <= cfg.encoder_hidden_size and last <= 128


def test_pp_doclayout_v3_neck_reads_the_backbone_widths():
    cfg = shrunk("pp_doclayout_v3")
    out = list(cfg.backbone_config.stage_out_channels)
    assert cfg.x4_feat_dim == out[0]
    assert list(cfg.encoder_in_channels) == out[1:]


def test_uvdoc_head_reads_every_bridge():
    cfg = shrunk("uvdoc")
    backbone = cfg.backbone_config
    bridges = len(backbone.stage_configs)
    assert len(backbone.out_features) == bridges  # the default reports 1
    widths = {bridge[0][0] for bridge in backbone.stage_configs}
    assert widths == {cfg.bridge_connector[0]}
    # ResNet stages chain: each stage's first input is the last one's output
    stages = backbone.resnet_configs
    for before, after in zip(stages, stages[1:], strict=False):
        assert after[0][0] == before[-1][1]
    assert max(c for stage in stages for block in stage for c in block[:2]) <= 16


# --- layers: kept layers renumbered, heads per layer kind ---------------------


def test_kolibri_layer_references_follow_the_kept_layers():
    cfg = shrunk("kolibri1_1")
    cfg.validate_architecture()  # the config's own checks of its layer references
    n = len(cfg.layer_types)
    assert all(0 <= s < n for s in cfg.kv_source_layers)
    assert all(0 <= i < n for i in cfg.index_layers + cfg.mlp_only_layers)


def test_mimo_sliding_layers_keep_grouped_heads():
    cfg = shrunk("mimo_v2_flash")
    swa_kv = 2 * cfg.num_key_value_heads  # its sliding layers double them
    assert cfg.num_attention_heads % swa_kv == 0


def test_step3p7_has_a_window_for_its_sliding_mask():
    assert isinstance(shrunk("step3p7").text_config.sliding_window, int)


@pytest.mark.parametrize("model_type", ["lw_detr", "rf_detr"])
def test_vit_backbone_outputs_are_kept_layers(model_type):
    backbone = shrunk(model_type).backbone_config
    layers = backbone.num_hidden_layers
    assert len(backbone.stage_names) == layers + 1
    assert backbone.out_indices and all(i <= layers for i in backbone.out_indices)


def test_lw_detr_projects_a_feature_level():
    cfg = shrunk("lw_detr")
    assert cfg.num_feature_levels == len(cfg.projector_scale_factors) >= 1
    assert cfg.projector_in_channels == [cfg.d_model] * cfg.num_feature_levels


# --- rope, tokens, vocabularies ------------------------------------------------


def test_ernie_mrope_section_fits_the_shrunk_head():
    text = shrunk("ernie4_5_vl_moe").text_config
    section = text.rope_parameters["mrope_section"]
    assert sum(section) == _head_size(text) // 2 and min(section) >= 1


def test_efficientloftr_stages_end_at_its_width():
    cfg = shrunk("efficientloftr")
    cfg.validate_architecture()
    assert cfg.out_features[-1] == cfg.hidden_size
    assert cfg.fine_fusion_dims == list(reversed(cfg.out_features))[:-1]
    assert [len(b) for b in cfg.stage_block_out_channels] == cfg.stage_num_blocks
    factor = cfg.rope_parameters["partial_rotary_factor"]
    head = cfg.hidden_size // cfg.num_attention_heads
    assert int(head * factor) == cfg.hidden_size // 2  # its 2-D RoPE's width


def test_lightglue_matches_descriptors_of_its_width_and_count():
    cfg = shrunk("lightglue")
    det = cfg.keypoint_detector_config
    assert cfg.descriptor_dim == det.descriptor_decoder_dim == cfg.hidden_size
    assert det.max_keypoints > 0 and det.keypoint_threshold == 0.0


def test_clvp_decoder_ids_fit_the_speech_encoder():
    cfg = shrunk("clvp")
    assert cfg.decoder_config.vocab_size <= cfg.speech_config.vocab_size
    for enc in (cfg.text_config, cfg.speech_config):
        # rotary width max(projection / (2 heads), 32) within a head
        rotary = max(enc.projection_dim // (enc.num_attention_heads * 2), 32)
        assert enc.hidden_size // enc.num_attention_heads >= rotary


def test_instructblipvideo_has_a_video_token():
    cfg = shrunk("instructblipvideo")
    assert 0 <= cfg.video_token_index < cfg.text_config.vocab_size


def test_inkling_vision_layers_cover_its_scales_without_scipy():
    from transformers.models.inkling.modeling_inkling import prime_factors

    vision = shrunk("inkling_mm_model").vision_config
    scales = 1 + len(prime_factors(vision.patch_size))
    scales += len(prime_factors(vision.temporal_patch_size))
    assert vision.n_layers >= scales  # fewer: scipy's linear_sum_assignment
    assert vision.patch_size**2 * vision.num_channels <= 64  # 4,800 at 40


def test_depth_pro_tiles_fit_the_shrunk_image():
    cfg = shrunk("depth_pro")
    assert cfg.patch_size / min(cfg.scaled_images_ratios) <= 64
    for sub in (cfg.image_model_config, cfg.patch_model_config, cfg.fov_model_config):
        assert sub.image_size == cfg.patch_size and sub.image_size % sub.patch_size == 0
    layers = cfg.patch_model_config.num_hidden_layers
    assert all(0 <= i < layers for i in cfg.intermediate_hook_ids)
    assert max(cfg.scaled_images_feature_dims + cfg.intermediate_feature_dims) <= 32


def test_default_config_problem_names_a_neck_its_backbone_cannot_feed():
    from gradcheck.backends._hf_config import default_config_problem

    why = default_config_problem(
        "pp_ocrv6_small_det", load_config("pp_ocrv6_small_det")
    )
    assert why and "default config" in why and "out_features" in why
    assert default_config_problem("rt_detr", load_config("rt_detr")) is None
    assert default_config_problem("bert", load_config("bert")) is None


@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_fastspeech2_module_dicts_follow_the_shrunk_values(part):
    cfg = shrunk("fastspeech2_conformer")
    module = getattr(cfg, f"{part}_config")  # what its modules read
    assert module["layers"] == getattr(cfg, f"{part}_layers") <= 2
    assert module["linear_units"] == getattr(cfg, f"{part}_linear_units") <= 64
    assert module["dropout_rate"] == 0.0 and module["attention_dropout_rate"] == 0.0


def test_pp_lcnet_v3_width_scale_is_capped_and_v4_left_alone():
    assert shrunk("pp_ocrv5_mobile_rec").backbone_config.scale <= 0.25
    # V4 scales the channels it reports but not its blocks': untouched
    assert shrunk("pp_ocrv6_small_rec").backbone_config.scale == 1.0


# --- built and run once (one forward, no gradient check) ----------------------


@pytest.mark.parametrize("model_type", ["gptj", "beam", "bridgetower"])
def test_shrunk_model_builds_and_runs(model_type):
    model, inputs, n = _hf.build(model_type, {}, f"hf:{model_type}", 0, 20_000_000)
    assert n > 0 and inputs
    with torch.no_grad():
        model(**inputs)


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_type",
    [
        "vits",
        "seamless_m4t",
        "uvdoc",
        "kolibri1_1",
        "efficientloftr",
        "depth_pro",
        "inkling_mm_model",
    ],
)
def test_shrunk_model_builds_and_runs_slow(model_type):
    model, inputs, n = _hf.build(model_type, {}, f"hf:{model_type}", 0, 20_000_000)
    with torch.no_grad():
        model(**inputs)
    assert n < 2_000_000


def test_reformer_trains_on_the_drawn_tokens_with_a_fixed_hash():
    cfg = shrunk("reformer")
    # train mode (its reversible backward's demand) wants the axial shape to
    # multiply to the sequence length and the sequence to be whole chunks
    assert cfg.axial_pos_shape[0] * cfg.axial_pos_shape[1] == TOKENS
    assert sum(cfg.axial_pos_embds_dim) == cfg.hidden_size
    for chunk in (cfg.lsh_attn_chunk_length, cfg.local_attn_chunk_length):
        assert TOKENS % chunk == 0 and chunk < TOKENS  # the LSH layer hashes
    assert cfg.num_buckets == 2 * TOKENS // cfg.lsh_attn_chunk_length
    assert cfg.hash_seed is not None  # the same rotations in every forward
    # its per-layer attention kinds are a tuple: cut to the kept layers
    assert cfg.attn_layers == ("local", "lsh")
    assert cfg.num_hidden_layers == 2


# --- grouped-query attention, MoE layers and layer index lists survive -------


@pytest.mark.parametrize(
    ("model_type", "path"),
    [("mistral", ""), ("mixtral", ""), ("qwen3_moe", ""), ("gemma3", "text_config")],
)
def test_grouped_query_attention_stays_grouped(model_type, path):
    cfg = shrunk(model_type)
    cfg = getattr(cfg, path) if path else cfg
    assert cfg.num_attention_heads == 2 and cfg.num_key_value_heads == 1


def test_multi_head_attention_stays_multi_head():
    cfg = shrunk("bert")  # no key/value heads of its own: nothing to group
    assert cfg.num_attention_heads == 2 and not hasattr(cfg, "num_key_value_heads")
    llama = shrunk("llama")  # its default kv heads = heads (None): not grouped
    assert llama.num_key_value_heads in (None, llama.num_attention_heads)


@pytest.mark.parametrize("model_type", ["deepseek_v3", "kimi_k25"])
def test_dense_first_layers_leave_a_moe_layer(model_type):
    cfg = shrunk(model_type)
    cfg = getattr(cfg, "text_config", cfg)
    assert cfg.num_hidden_layers == 2
    assert cfg.first_k_dense_replace == 1  # layer 0 dense, layer 1 MoE (was 3)


def test_every_nth_layer_moe_keeps_one():
    cfg = shrunk("nllb-moe")  # every 4th layer sparse: none of 2
    for side in ("encoder", "decoder"):
        layers, step = (
            getattr(cfg, f"{side}_layers"),
            getattr(cfg, f"{side}_sparse_step"),
        )
        assert any((i + 1) % step == 0 for i in range(layers))


@pytest.mark.parametrize(("model_type", "path"), [("step3p7", "text_config")])
def test_mlp_layer_types_keep_a_sparse_layer(model_type, path):
    cfg = getattr(shrunk(model_type), path)
    assert len(cfg.mlp_layer_types) == cfg.num_hidden_layers
    assert "sparse" in cfg.mlp_layer_types and "dense" in cfg.mlp_layer_types


def test_mlp_only_layers_leave_a_moe_layer():
    cfg = shrunk("flint")  # layers 0 and 1 dense of 49
    n = cfg.num_hidden_layers
    assert all(0 <= i < n for i in cfg.mlp_only_layers)
    assert set(range(n)) - set(cfg.mlp_only_layers)  # a MoE layer
    assert len(cfg.layer_types) == n


def test_layer_index_lists_follow_the_kept_layers():
    llama4 = shrunk("llama4_text")  # MoE layers 0..47, kept layers renumbered
    n = llama4.num_hidden_layers
    assert list(llama4.moe_layers) == list(range(n))
    lfm2 = shrunk("lfm2")  # its default: full attention in all 32 layers
    assert list(lfm2.full_attn_idxs) == list(range(lfm2.num_hidden_layers))
    assert all(lfm2.layer_types[i] == "full_attention" for i in lfm2.full_attn_idxs)


def test_index_lists_are_remapped_not_cut_by_position():
    from types import SimpleNamespace

    from gradcheck.backends._hf_config import _remap_layer_sets

    cfg = SimpleNamespace(
        mlp_only_layers=[0, 3, 7], hybrid_layer_ids=(2, 6), full_attn_idxs=[3]
    )
    _remap_layer_sets(cfg, [0, 3])  # old layers 0 and 3 kept as 0 and 1
    assert cfg.mlp_only_layers == [0, 1]
    assert cfg.hybrid_layer_ids == ()  # neither named layer kept
    assert cfg.full_attn_idxs == [1]


def test_zamba2_keeps_a_hybrid_layer_with_its_wide_attention():
    cfg = shrunk("zamba2")  # its first hybrid (shared attention) layer is 6 of 54
    assert cfg.layers_block_type == ["linear_attention", "hybrid"]
    assert list(cfg.hybrid_layer_ids) == [1]  # renumbered: layer 6 kept as 1
    # the shared block reads [hidden, embeddings]: twice the width
    assert cfg.attention_hidden_size == 2 * cfg.hidden_size
    assert cfg.attention_head_dim * cfg.num_attention_heads == cfg.attention_hidden_size
