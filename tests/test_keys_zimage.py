"""Real-size Z-Image-Turbo key map: diffusers' model (on meta, docs/MODELS.md §Z1 config) vs ours, key for key.

No weights are allocated: both models are built on the meta device and only names and shapes are compared.
"""
import pytest
import torch

from flux_core.torch.zimage import ZImageConfig, ZImageTransformer
from flux_core.weights import zimage as zkeys
from refs import zimage as ref_zimage


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.fixture(scope="module")
def diffusers_sd():
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        model = ZImageTransformer2DModel(**ref_zimage.REAL)
    return model.state_dict()


@pytest.fixture(scope="module")
def native(diffusers_sd):
    return zkeys.to_native(diffusers_sd)


@pytest.fixture(scope="module")
def ours(native):
    with torch.device("meta"):
        return ZImageTransformer(ZImageConfig.from_state_dict(native))


def test_config_from_shapes(ours):
    cfg = ours.config
    assert (cfg.dim, cfg.n_layers, cfg.n_refiner_layers, cfg.n_heads, cfg.head_dim) == (3840, 30, 2, 30, 128)
    assert cfg.axes_dims == (32, 48, 48)
    assert (cfg.cap_feat_dim, cfg.ffn_hidden, cfg.adaln_dim, cfg.t_hidden) == (2560, 10240, 256, 1024)
    assert cfg.in_channels == 16 and cfg.patch_size == 2
    assert cfg.axes_lens == (1536, 512, 512) and cfg.rope_theta == 256.0


def test_config_json_equals_shapes(ours):
    assert ZImageConfig.from_diffusers(ref_zimage.REAL) == ours.config


def test_converted_keys_equal_our_model(native, ours):
    assert _shapes(native) == _shapes(ours.state_dict())


def test_inverse_map_gives_diffusers_keys(diffusers_sd, ours):
    assert _shapes(zkeys.to_diffusers(ours.state_dict())) == _shapes(diffusers_sd)


def test_diffusers_converter_accepts_our_keys(diffusers_sd, ours):
    """Our module names are the original single-file keys: diffusers' own converter maps them to its model."""
    sd = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    assert _shapes(ref_zimage.diffusers_from_original(sd)) == _shapes(diffusers_sd)


def test_param_count(diffusers_sd, ours):
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(v.numel() for v in diffusers_sd.values())
    assert round(n_ours / 1e9, 3) == 6.155


def test_reference_key_table_block0(native):
    """Spot-check the fused and renamed rows of the key table in docs/MODELS.md §Z4."""
    s = _shapes(native)
    assert s["layers.0.attention.qkv.weight"] == (11520, 3840)
    assert s["context_refiner.1.attention.out.weight"] == (3840, 3840)
    assert s["noise_refiner.0.attention.q_norm.weight"] == (128,)
    assert s["x_embedder.weight"] == (3840, 64)
    assert s["final_layer.adaLN_modulation.1.weight"] == (3840, 256)
    assert s["x_pad_token"] == s["cap_pad_token"] == (1, 3840)
    assert not any(k.startswith("context_refiner.") and "adaLN" in k for k in s)
