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


# --- built and run once (one forward, no gradient check) ----------------------


@pytest.mark.parametrize("model_type", ["gptj", "beam", "bridgetower"])
def test_shrunk_model_builds_and_runs(model_type):
    model, inputs, n = _hf.build(model_type, {}, f"hf:{model_type}", 0, 20_000_000)
    assert n > 0 and inputs
    with torch.no_grad():
        model(**inputs)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["vits", "seamless_m4t"])
def test_shrunk_vocoder_model_builds_and_runs(model_type):
    model, inputs, n = _hf.build(model_type, {}, f"hf:{model_type}", 0, 20_000_000)
    with torch.no_grad():
        model(**inputs)
    assert n < 2_000_000
