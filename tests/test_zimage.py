"""Z-Image transformer (torch) parity with diffusers' ZImageTransformer2DModel at a tiny random config.

Tolerance: <= 1e-5 relative (max|a-b| / max|b|), float32 CPU. The two implementations do the same float32 math in a
different op order (fused qkv matmul, fused RMSNorm), which measures 4e-7 to 6e-7 here.
"""
import pytest
import torch

from conftest import rel_err
from flux_core.errors import ConfigError, WeightError
from flux_core.configs import axes_dims_for
from flux_core.torch.zimage import (ZImageConfig, ZImageTransformer, load_zimage, patchify,
                                    position_ids, unpatchify)
from flux_core.weights import zimage as zkeys
from flux_core.weights.io import Checkpoint, load_checkpoint, save_safetensors
from refs import zimage as ref_zimage

TOL = 1e-5
C, CAP = 16, 32


@pytest.fixture(scope="module")
def ref():
    return ref_zimage.build_reference(seed=0)


@pytest.fixture(scope="module")
def files(ref, tmp_path_factory):
    return ref_zimage.save_layouts(ref, tmp_path_factory.mktemp("zimage"))


@pytest.fixture(scope="module")
def ours(files):
    return {name: load_zimage(path) for name, path in files.items()}


def _inputs(b, h, w, lens, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, C, h, w, generator=g)
    t = torch.rand(b, generator=g)
    caps = [torch.randn(n, CAP, generator=g) for n in lens]
    return x, t, caps


# ------------------------------------------------------------------------------------------------ fixtures and keys


def test_original_file_matches_diffusers_converter(ref, files):
    """Our hand-written original layout, run through diffusers' own converter, gives back the diffusers weights."""
    want = ref.state_dict()
    for name in ("original", "prefixed"):
        got = ref_zimage.diffusers_from_original(load_checkpoint(files[name]).sd)
        assert set(got) == set(want), name
        assert all(torch.equal(got[k], want[k]) for k in want), name


def test_keymap_roundtrip(ref, files):
    native = load_checkpoint(files["original"]).sd
    from_diffusers = zkeys.to_native(ref.state_dict())
    assert set(from_diffusers) == set(native)
    assert all(torch.equal(from_diffusers[k], native[k]) for k in native)
    back = zkeys.to_diffusers(native)
    assert set(back) == set(ref.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())


def test_layout_detection(ref, files):
    assert zkeys.detect_layout(ref.state_dict()) == "diffusers"
    assert zkeys.detect_layout(load_checkpoint(files["original"]).sd) == "original"
    assert zkeys.detect_layout(load_checkpoint(files["prefixed"]).sd) == "original"
    assert zkeys.detect_layout({"img_in.weight": torch.zeros(1), "double_blocks.0.img_attn.qkv.weight": 0}) is None


def test_config_from_shapes_equals_config_json(ours, files):
    from_json = ours["diffusers"].config
    assert load_checkpoint(files["diffusers"]).config is not None
    assert ours["original"].config == from_json == ours["prefixed"].config
    assert from_json.axes_dims == tuple(ref_zimage.TINY["axes_dims"])
    assert from_json.ffn_hidden == int(ref_zimage.TINY["dim"] / 3 * 8)


def test_axes_rule():
    assert axes_dims_for(128) == (32, 48, 48)  # the real model
    assert axes_dims_for(32) == (8, 12, 12)  # diffusers' tiny test config
    for d in (16, 64, 96, 256):
        a = axes_dims_for(d)
        assert sum(a) == d and all(x % 2 == 0 and x > 0 for x in a)


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("layout", ["diffusers", "original", "prefixed"])
@pytest.mark.parametrize("h,w,cap_len", [
    (8, 8, 7),  # 16 patches -> padded to 32; caption 7 -> 32
    (6, 10, 32),  # non-square, 15 patches; caption exactly 32 (no caption pad)
    (16, 12, 45),  # 48 patches -> 64; caption 45 -> 64
    (16, 16, 64),  # 64 patches, no image pad; caption 64
])
def test_parity(ref, ours, layout, h, w, cap_len):
    x, t, caps = _inputs(1, h, w, [cap_len])
    want = ref_zimage.reference_forward(ref, x, t, caps)
    got = ours[layout](x, t, caps)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert rel_err(got, want) <= TOL


def test_parity_batch_different_caption_lengths(ref, ours):
    # 5 -> 32 and 40 -> 64 padded tokens: attention masks for the batch padding, in the caption refiner and main layers
    x, t, caps = _inputs(2, 8, 10, [5, 40])
    want = ref_zimage.reference_forward(ref, x, t, caps)
    model = ours["original"]
    got = model(x, t, caps)
    assert rel_err(got, want) <= TOL
    for i in range(2):  # and each item equals its own batch-1 run (the mask hides exactly the padding)
        assert rel_err(got[i:i + 1], model(x[i:i + 1], t[i:i + 1], caps[i:i + 1])) <= TOL


def test_parity_batch_same_padded_length_and_tensor_captions(ref, ours):
    x, t, caps = _inputs(2, 8, 8, [20, 20])
    want = ref_zimage.reference_forward(ref, x, t, caps)
    model = ours["diffusers"]
    assert rel_err(model(x, t, caps), want) <= TOL
    assert torch.equal(model(x, t, torch.stack(caps)), model(x, t, caps))
    # 20 and 30 tokens both pad to 32: no mask is needed and none is built
    rope = model.make_rope([20, 30], 8, 8)
    assert rope.cap_mask is None and rope.joint_mask is None


def test_pad_tokens_and_timestep_matter(ref, ours, files):
    """Controls for the parity test: the learned pad tokens and t must change the output, else parity proves little."""
    x, t, caps = _inputs(1, 8, 8, [7])
    model = ours["original"]
    base = model(x, t, caps)
    assert rel_err(model(x, t + 0.1, caps), base) > 1e-3
    sd = load_checkpoint(files["original"]).sd
    for key in ("x_pad_token", "cap_pad_token"):
        m2 = load_zimage(Checkpoint({**sd, key: torch.zeros_like(sd[key])}))  # also: a Checkpoint loads
        assert rel_err(m2(x, t, caps), base) > 1e-3, key


def test_rope_cache_reuse(ours):
    model = ours["original"]
    x, t, caps = _inputs(2, 6, 8, [9, 33])
    rope = model.make_rope([9, 33], 6, 8)
    for step_t in (t, t * 0.5):  # the same cache across steps gives bit-identical results
        assert torch.equal(model(x, step_t, caps, rope_cache=rope), model(x, step_t, caps))
    with pytest.raises(ConfigError, match="rope_cache"):
        model(x, t, [caps[0], caps[0]], rope_cache=rope)


def test_position_ids():
    cap, img = position_ids(32, 2, 3)
    assert cap[:, 0].tolist() == list(range(1, 33)) and not cap[:, 1:].any()
    assert img.shape == (32, 3)
    assert img[:6].tolist() == [[33, h, w] for h in range(2) for w in range(3)]
    assert not img[6:].any()  # image pad tokens sit at (0, 0, 0)


def test_patchify_roundtrip_and_order():
    x = torch.randn(2, C, 4, 6)
    tok = patchify(x, 2)
    assert tok.shape == (2, 6, 64)
    assert torch.equal(unpatchify(tok, 4, 6, 2), x)
    # vector index (ph*2 + pw)*C + c: token 0, entry C+3 is pixel (0, 1) of channel 3
    assert tok[0, 0, C + 3] == x[0, 3, 0, 1]


def test_bfloat16_load(ref, files):
    x, t, caps = _inputs(1, 8, 8, [7])
    want = ref_zimage.reference_forward(ref, x, t, caps)
    model = load_zimage(files["original"], dtype=torch.bfloat16)
    assert model.x_embedder.weight.dtype == torch.bfloat16
    got = model(x, t, caps)
    assert got.dtype == torch.float32 and rel_err(got, want) < 5e-2  # bf16 has ~3 significant digits


# ------------------------------------------------------------------------------------------------ errors


def _file_sd(files):
    return dict(load_checkpoint(files["prefixed"]).sd)


def _load_sd(sd, tmp_path):
    path = tmp_path / "broken.safetensors"
    save_safetensors(sd, path)
    return load_zimage(path)


def test_strict_missing_key(files, tmp_path):
    sd = _file_sd(files)
    del sd["model.diffusion_model.layers.1.feed_forward.w2.weight"]
    with pytest.raises(WeightError, match=r"missing keys.*layers\.1\.feed_forward\.w2\.weight"):
        _load_sd(sd, tmp_path)


def test_strict_unexpected_key(files, tmp_path):
    sd = _file_sd(files)
    sd["model.diffusion_model.layers.0.attention.out.bias"] = torch.zeros(64)
    with pytest.raises(WeightError, match=r"unexpected keys.*layers\.0\.attention\.out\.bias"):
        _load_sd(sd, tmp_path)


def test_strict_wrong_shape(files, tmp_path):
    sd = _file_sd(files)
    sd["model.diffusion_model.cap_pad_token"] = torch.zeros(1, 65)
    with pytest.raises(WeightError, match=r"wrong shapes.*cap_pad_token"):
        _load_sd(sd, tmp_path)


def test_stray_norm_final_is_ignored(ref, files, tmp_path):
    sd = _file_sd(files)
    sd["model.diffusion_model.norm_final.weight"] = torch.ones(64)
    model = _load_sd(sd, tmp_path)
    x, t, caps = _inputs(1, 8, 8, [7])
    assert rel_err(model(x, t, caps), ref_zimage.reference_forward(ref, x, t, caps)) <= TOL


def test_diffusers_missing_partner_and_foreign_file(ref):
    sd = dict(ref.state_dict())
    del sd["layers.0.attention.to_v.weight"]
    with pytest.raises(WeightError, match=r"layers\.0\.attention\.to_v\.weight"):
        zkeys.to_native(sd)
    with pytest.raises(WeightError, match="not a Z-Image"):
        zkeys.to_native({"img_in.weight": torch.zeros(2, 2), "double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)})


def test_bad_inputs(ours):
    model = ours["original"]
    x, t, caps = _inputs(1, 7, 8, [5])
    with pytest.raises(ConfigError, match="patch size"):
        model(x, t, caps)
    x, t, caps = _inputs(2, 8, 8, [5])
    with pytest.raises(ConfigError, match="captions for a batch"):
        model(x, t, caps)


def test_config_rejects_inconsistent_axes():
    with pytest.raises(ConfigError):
        ZImageConfig(dim=64, n_heads=2, axes_dims=(8, 8, 8))
    assert ZImageTransformer(ZImageConfig(dim=64, n_heads=2, n_layers=1, n_refiner_layers=1, cap_feat_dim=8,
                                          ffn_hidden=32, adaln_dim=64, axes_dims=(8, 12, 12))) is not None


def test_rope_requests_outside_the_model_are_clear_errors():
    """Both backends validate make_rope through the shared config: odd latent sizes, empty captions, positions past
    the trained RoPE range."""
    from flux_core.errors import ConfigError
    from flux_core.torch.zimage import ZImageConfig

    cfg = ZImageConfig()
    assert cfg.padded_caption_lengths([7, 32, 33], 16, 16) == [32, 32, 64]
    with pytest.raises(ConfigError, match="patch size"):
        cfg.padded_caption_lengths([7], 15, 16)
    with pytest.raises(ConfigError, match="at least one token"):
        cfg.padded_caption_lengths([0], 16, 16)
    cfg.check_positions([1535, 511, 511])
    with pytest.raises(ConfigError, match="too large"):
        cfg.check_positions([10, 512, 4])


def test_rmsnorm_rounds_like_diffusers_in_every_dtype_pairing():
    """Z-Image's RMSNorm (diffusers' RMSNorm): the normalised value is rounded to the weight's dtype only when the
    weight is half precision; a float32 weight beside bf16 activations keeps it unrounded."""
    from diffusers.models.normalization import RMSNorm as Ref

    from flux_core.torch.zimage import RMSNorm

    g = torch.Generator().manual_seed(0)
    x32 = torch.randn(3, 7, 64, generator=g) * 2
    w = 1 + 0.1 * torch.randn(64, generator=g)
    for xdt, wdt in [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                     (torch.float32, torch.float32)]:
        ours, ref = RMSNorm(64, 1e-5), Ref(64, eps=1e-5)
        ours.weight.data, ref.weight.data = w.to(wdt), w.to(wdt)
        x = x32.to(xdt)
        got, want = ours(x), ref(x)
        assert got.dtype == want.dtype and torch.equal(got, want), (xdt, wdt)
