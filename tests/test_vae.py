"""FLUX.2 and FLUX.1 VAE parity with diffusers at tiny random-weight configs, every supported file layout.

Reference paths are the pipelines' own (tests/refs/vae.py): FLUX.2 encode = Flux2KleinPipeline._encode_vae_image
(argmax posterior, _patchify_latents, BN normalise); decode = the pipeline's BN de-normalise, _unpatchify_latents,
vae.decode, postprocess. FLUX.1 = Z-Image's (mean - shift) * scale and its inverse.
Tolerance 1e-5 relative (max|a-b| / max|b|): float32 with the same math, only kernel choice differs
(1x1 conv vs Linear in the mid attention), measured about 2e-7 (encode) and 2e-6 (decode).
"""
import pytest
import torch
from conftest import rel_err

from flux_core.errors import ConfigError, WeightError
from flux_core.torch.vae import Flux1VAE, Flux2VAE, load_vae, patchify, unpatchify
from flux_core.weights import vae as W
from flux_core.weights.io import load_checkpoint
from refs import vae as R

TOL = 1e-5
# Non-square, batch 2. FLUX.2 needs multiples of 16 (48x80 -> a 3x5 latent, odd on purpose), FLUX.1 of 8.
SIZES = {"flux2": (48, 80), "flux1": (40, 72)}
BUILD = {"flux2": {}, "flux1": {"layers_per_block": 2}}  # cover 1 and 2 resnets per encoder level
LAYOUTS = [("flux2", "diffusers"), ("flux2", "ldm"), ("flux2", "comfy"), ("flux1", "diffusers"), ("flux1", "ldm")]


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    out = {}
    for kind in ("flux2", "flux1"):
        model = R.build_reference(kind, **BUILD[kind])
        out[kind] = (model, R.save_layouts(model, kind, tmp_path_factory.mktemp(kind)))
    return out


def _image(kind, batch=2, seed=1):
    h, w = SIZES[kind]
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind,layout", LAYOUTS)
def test_encode_decode_parity(refs, kind, layout):
    model, paths = refs[kind]
    vae = load_vae(paths[layout])
    enc_ref, dec_ref = (R.flux2_encode, R.flux2_decode) if kind == "flux2" else (R.flux1_encode, R.flux1_decode)

    img = _image(kind)
    z = vae.encode(img)
    want = enc_ref(model, img)
    assert z.shape == want.shape and z.dtype == torch.float32
    assert rel_err(z, want) <= TOL, rel_err(z, want)

    # decode a latent with the statistics of a real one (the encoded one plus noise), not just the encoder's output
    lat = want + 0.5 * torch.randn(want.shape, generator=torch.Generator().manual_seed(2))
    out, ref = vae.decode(lat), dec_ref(model, lat)
    assert out.shape == (2, 3, *SIZES[kind]) and 0 <= out.min() and out.max() <= 1
    assert rel_err(out, ref) <= TOL, rel_err(out, ref)


def test_other_layouts_load_the_same_weights(refs):
    """Pipeline folder (`vae/` subfolder) and `vae.`-prefixed single files: bit-identical to the plain LDM file."""
    for kind, layouts in (("flux2", ("pipeline", "prefixed")), ("flux1", ("pipeline", "prefixed"))):
        want = load_vae(refs[kind][1]["ldm"]).state_dict()
        for layout in layouts:
            got = load_vae(refs[kind][1][layout]).state_dict()
            assert set(got) == set(want), (kind, layout)
            assert all(torch.equal(got[k], want[k]) for k in want), (kind, layout)


def test_raw_decoder_matches_unclamped(refs):
    """The clamp in decode could hide an error in saturated pixels: compare the raw decoder output too."""
    for kind in ("flux2", "flux1"):
        model, paths = refs[kind]
        vae = load_vae(paths["ldm"])
        z = torch.randn(2, vae.config.z_channels, 5, 9, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            ours, ref = vae.decoder(z), model.decode(z).sample
        assert rel_err(ours, ref) <= TOL, (kind, rel_err(ours, ref))


def test_detection_and_attributes(refs):
    for kind, cls in (("flux2", Flux2VAE), ("flux1", Flux1VAE)):
        model, paths = refs[kind]
        cfg = model.config
        for layout in ("diffusers", "ldm"):
            vae = load_vae(paths[layout])
            assert type(vae) is cls and vae.kind == kind
            assert vae.dtype == torch.float32 and vae.device.type == "cpu"
            assert vae.config.norm_num_groups == cfg.norm_num_groups
            assert vae.config.enc_channels == tuple(cfg.block_out_channels)
            assert vae.config.enc_blocks == cfg.layers_per_block and vae.config.dec_blocks == cfg.layers_per_block + 1
            levels = 2 ** (len(cfg.block_out_channels) - 1)
            if kind == "flux2":
                assert vae.latent_channels == 4 * cfg.latent_channels and vae.downscale == 2 * levels
                assert vae.config.batch_norm_eps == cfg.batch_norm_eps
            else:
                assert vae.latent_channels == cfg.latent_channels and vae.downscale == levels
                assert (vae.config.scaling_factor, vae.config.shift_factor) == (cfg.scaling_factor, cfg.shift_factor)
    # a Checkpoint or a plain state dict works too (groups then come from the argument)
    ckpt = load_checkpoint(refs["flux2"][1]["ldm"])
    assert isinstance(load_vae(ckpt), Flux2VAE)
    assert isinstance(load_vae(dict(ckpt.sd), norm_num_groups=4), Flux2VAE)


def test_group_count_needs_config_or_argument(refs):
    model, paths = refs["flux2"]
    with pytest.raises(ConfigError, match="norm_num_groups"):
        load_vae(paths["ldm_noconfig"])  # default 32 groups cannot divide widths 8/16
    vae = load_vae(paths["ldm_noconfig"], norm_num_groups=4)
    img = _image("flux2", batch=1)
    assert rel_err(vae.encode(img), R.flux2_encode(model, img)) <= TOL
    # the argument wins over config.json: 8 groups also divide 8/16, and must change the result
    other = load_vae(paths["diffusers"], norm_num_groups=8)
    assert other.config.norm_num_groups == 8
    assert rel_err(other.encode(img), R.flux2_encode(model, img)) > 1e-3


def test_ldm_layout_is_what_diffusers_converts(refs):
    """Our map (diffusers -> LDM) equals the hand-written LDM dict, which diffusers' converter maps back exactly."""
    for kind in ("flux2", "flux1"):
        model, _ = refs[kind]
        ldm = R.ldm_state_dict(model)
        R.check_ldm_with_diffusers(ldm, model)
        ldm.pop("bn.num_batches_tracked", None)
        ours = W.to_native(model.state_dict())
        assert set(ours) == set(ldm)
        assert all(torch.equal(ours[k], ldm[k]) for k in ldm)
        # and back: from_native restores the diffusers dict (minus the ignored training counter)
        back = W.from_native(ours, "diffusers")
        want = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
        assert set(back) == set(want) and all(torch.equal(back[k], want[k]) for k in want)


def test_strict_errors_name_offenders(refs):
    sd = dict(load_checkpoint(refs["flux2"][1]["ldm"]).sd)
    drop, drop_attn = "decoder.up.1.block.0.conv2.bias", "decoder.mid.attn_1.q.weight"
    bad = {k: v for k, v in sd.items() if k not in (drop, drop_attn)}
    bad["decoder.mid.attn_1.extra.weight"] = torch.zeros(1)
    bad["encoder.mid.attn_1.proj_out.weight"] = bad["encoder.mid.attn_1.proj_out.weight"][:, :, 0, 0]
    with pytest.raises(WeightError) as e:
        load_vae(bad, norm_num_groups=4)
    msg = str(e.value)
    for key in (drop, drop_attn, "decoder.mid.attn_1.extra.weight", "encoder.mid.attn_1.proj_out.weight"):
        assert key in msg, key

    # a FLUX.1 file carrying quant convs (an SD-style VAE) is refused, naming them
    sd1 = dict(load_checkpoint(refs["flux1"][1]["ldm"]).sd)
    sd1["quant_conv.weight"] = torch.zeros(32, 32, 1, 1)
    sd1["quant_conv.bias"] = torch.zeros(32)
    with pytest.raises(WeightError, match="quant_conv"):
        load_vae(sd1, norm_num_groups=4)

    with pytest.raises(WeightError, match="not a VAE"):
        load_vae({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 3)})


def test_bad_inputs_are_config_errors(refs):
    vae = load_vae(refs["flux2"][1]["ldm"])
    with pytest.raises(ConfigError, match="multiple of 16"):
        vae.encode(torch.rand(1, 3, 40, 48))
    with pytest.raises(ConfigError, match="latents"):
        vae.decode(torch.zeros(1, 16 * 4 + 1, 3, 3))


def test_bfloat16_keeps_stats_float32(refs):
    model, paths = refs["flux2"]
    vae = load_vae(paths["ldm"], dtype=torch.bfloat16)
    assert vae.dtype == torch.bfloat16 and vae.bn.running_mean.dtype == torch.float32
    img = _image("flux2", batch=1)
    z = vae.encode(img)
    assert z.dtype == torch.float32 and rel_err(z, R.flux2_encode(model, img)) < 0.1
    out = vae.decode(z)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_patchify_matches_pipeline():
    from diffusers import Flux2KleinPipeline

    z = torch.randn(2, 4, 6, 10)
    p = patchify(z)
    assert torch.equal(p, Flux2KleinPipeline._patchify_latents(z))
    assert torch.equal(unpatchify(p), z)
    assert torch.equal(unpatchify(p), Flux2KleinPipeline._unpatchify_latents(p))
    # channel c*4 + ph*2 + pw (docs/MODELS.md §V1)
    assert torch.equal(p[:, 3 * 4 + 1 * 2 + 0], z[:, 3, 1::2, 0::2])
