"""FLUX.2 [klein] key maps at real size (4B and 9B), on the meta device: nothing is allocated, no file is needed.

The diffusers model is built with the published geometry; its key -> shape table, converted with our map, must equal
our model's table exactly, and diffusers' own BFL converter applied to our model's keys must give diffusers' table.
"""
import pytest
import torch

from refs import klein as R

from flux_core.torch.klein import Flux2Transformer, KleinConfig, position_ids, rope_table, text_ids
from flux_core.weights import klein as K

VARIANTS = {"klein-4b": R.KLEIN_4B, "klein-9b": R.KLEIN_9B}
# Parameter counts (docs/MODELS.md §K1, in billions to 3 decimals) as a sanity anchor; the exact check is against
# diffusers' own model.
PUBLISHED_BILLIONS = {"klein-4b": 3.876, "klein-9b": 9.079}


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request):
    """(name, diffusers config, diffusers meta model, our config from shapes, our meta model)."""
    config = VARIANTS[request.param]
    theirs = R.build_meta(**config)
    cfg = KleinConfig.from_state_dict(K.to_native(theirs.state_dict()))
    with torch.device("meta"):
        ours = Flux2Transformer(cfg)
    return request.param, config, theirs, cfg, ours


def test_diffusers_keys_convert_to_ours_exactly(pair):
    _, _, theirs, _, ours = pair
    assert _shapes(K.to_native(theirs.state_dict())) == _shapes(ours.state_dict())


def test_our_keys_convert_back_with_diffusers_converter(pair):
    _, _, theirs, _, ours = pair
    assert _shapes(R.diffusers_converter(ours.state_dict())) == _shapes(theirs.state_dict())
    assert _shapes(K.DIFFUSERS.from_native(ours.state_dict())) == _shapes(theirs.state_dict())


def test_bfl_layout_with_comfy_prefix_and_norm_weight_names(pair):
    _, _, theirs, _, ours = pair
    bfl = R.diffusers_to_bfl(theirs.state_dict())
    comfy = {"model.diffusion_model." + (k[:-5] + "weight" if k.endswith("_norm.scale") else k): v
             for k, v in bfl.items()}
    assert _shapes(K.to_native(comfy)) == _shapes(ours.state_dict())


def test_config_detected_from_shapes(pair):
    _, config, theirs, cfg, _ = pair
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    assert cfg.hidden_size == heads * head_dim and cfg.num_heads == heads and cfg.head_dim == head_dim
    assert (cfg.depth, cfg.depth_single) == (config["num_layers"], config["num_single_layers"])
    assert cfg.context_in_dim == config["joint_attention_dim"] and cfg.in_channels == config["in_channels"]
    assert cfg.mlp_ratio == config["mlp_ratio"] and cfg.axes_dim == tuple(config["axes_dims_rope"])
    assert cfg.theta == config["rope_theta"] and cfg.eps == config["eps"] and not cfg.guidance_embed
    # the diffusers config.json path gives the same numbers
    assert KleinConfig.from_state_dict({}, dict(theirs.config)) == cfg


def test_parameter_count_equals_diffusers(pair):
    name, _, theirs, _, ours = pair
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in theirs.parameters())
    assert round(n / 1e9, 3) == PUBLISHED_BILLIONS[name]
    assert not any(k.endswith(".bias") for k in ours.state_dict())


def test_forward_flops_match_the_analytic_count(pair):
    """FlopCounterMode on the meta device at 512x512 (1024 image + 512 text tokens) vs
    2 * (per-token linear params) * tokens + 4 * S^2 * D per attention layer (docs/MODELS.md §F)."""
    from torch.utils.flop_counter import FlopCounterMode

    _, _, _, cfg, ours = pair
    n_img, n_txt, D, M = 1024, 512, cfg.hidden_size, cfg.mlp_hidden
    img_ids, txt_ids = position_ids(32, 32), text_ids(n_txt)
    pe = rope_table(img_ids, txt_ids, cfg.axes_dim, cfg.theta).to("meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        out = ours(torch.empty(1, n_img, cfg.in_channels, device="meta"), img_ids,
                   torch.empty(1, n_txt, cfg.context_in_dim, device="meta"), txt_ids,
                   torch.empty(1, device="meta"), pe=pe)
    assert out.shape == (1, n_img, cfg.out_channels)

    stream = 3 * D * D + D * D + 2 * M * D + M * D            # one double-block stream: qkv, proj, mlp in / out
    single = D * (3 * D + 2 * M) + (D + M) * D                 # linear1 + linear2
    per_img = cfg.in_channels * D + cfg.depth * stream + cfg.depth_single * single + D * cfg.out_channels
    per_txt = cfg.context_in_dim * D + cfg.depth * stream + cfg.depth_single * single
    S = n_img + n_txt
    analytic = 2 * (per_img * n_img + per_txt * n_txt) + (cfg.depth + cfg.depth_single) * 4 * S * S * D
    assert abs(counter.get_total_flops() / analytic - 1) < 1e-3   # the rest is the per-sample modulation MLPs
