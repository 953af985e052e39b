"""MLX FLUX.2 / FLUX.1 VAEs (flux_core/mlx/vae.py) vs the torch VAEs (flux_core/torch/vae.py, themselves equal to the
diffusers pipelines' encode/decode to ~1e-6, tests/test_vae.py) on the same tiny checkpoints, several file layouts.

float32: encode (normalised latents) and decode (images in [0,1]) <= 1e-4 relative (max|a-b| / max|b|; measured
1e-6 to 4e-6), batch 2, non-square. bf16: MLX's conv adds the bias after rounding the convolution (torch fuses it),
a 1-ulp difference that then grows into independent bf16 rounding noise through ~25 layers: both backends end about
1.5e-2 (encode) / 4e-2 (decode) from float32 (measured MLX 1.5e-2 / 4.1e-2, torch 1.3e-2 / 3.2e-2 for FLUX.2), and
1-5e-2 from each other. So bf16 is checked as "bit-identical weights, float32 BN statistics, float32 latents and
images, and MLX bf16 within 2x of torch bf16's own distance to the float32 truth".
"""
import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")

from conftest import rel_err  # noqa: E402
from flux_core.errors import ConfigError, WeightError  # noqa: E402
from flux_core.mlx.vae import Flux1VAE, Flux2VAE, attention, load_vae, patchify, unpatchify  # noqa: E402
from flux_core.torch import vae as T  # noqa: E402
from flux_core.weights.io import load_checkpoint  # noqa: E402
from refs import vae as R  # noqa: E402

TOL = 1e-4
SIZES = {"flux2": (48, 80), "flux1": (40, 72)}  # non-square; FLUX.2 needs multiples of 16 (3x5 latent), FLUX.1 of 8
BUILD = {"flux2": {}, "flux1": {"layers_per_block": 2}}  # 1 and 2 resnets per encoder level
LAYOUTS = [("flux2", "ldm"), ("flux2", "diffusers"), ("flux2", "comfy"), ("flux1", "ldm"), ("flux1", "diffusers")]


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    out = {}
    for kind in ("flux2", "flux1"):
        model = R.build_reference(kind, **BUILD[kind])
        out[kind] = R.save_layouts(model, kind, tmp_path_factory.mktemp(kind))
    return out


def _image(kind, batch=2, seed=1):
    h, w = SIZES[kind]
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _np(a):
    return np.array(a.astype(mx.float32))


def _roundtrip(vae, img, lat):
    """encode(img) and decode(lat), numpy img / latent in (the pipeline hands numpy or mx), numpy out."""
    z, x = vae.encode(mx.array(img.numpy())), vae.decode(lat.numpy())
    mx.eval(z, x)
    return z, x


@pytest.mark.parametrize("kind,layout", LAYOUTS)
def test_encode_decode_match_torch(refs, kind, layout):
    ckpt = load_checkpoint(refs[kind][layout])
    ref, vae = T.load_vae(ckpt), load_vae(ckpt, "float32")
    img = _image(kind)
    want_z = ref.encode(img)
    # decode a latent with the statistics of a real one (the encoded one plus noise), not just the encoder's output
    lat = want_z + 0.5 * torch.randn(want_z.shape, generator=torch.Generator().manual_seed(2))
    want_x = ref.decode(lat)
    z, x = _roundtrip(vae, img, lat)
    assert z.dtype == mx.float32 and z.shape == tuple(want_z.shape)
    assert x.dtype == mx.float32 and x.shape == (2, 3, *SIZES[kind])
    assert rel_err(_np(z), want_z) <= TOL
    assert rel_err(_np(x), want_x) <= TOL
    assert 0 <= _np(x).min() and _np(x).max() <= 1


def test_interface_and_layout(refs):
    for kind, cls, lat_ch, down in (("flux2", Flux2VAE, 16, 16), ("flux1", Flux1VAE, 16, 8)):
        ckpt = load_checkpoint(refs[kind]["ldm"])
        vae, ref = load_vae(ckpt, "float32"), T.load_vae(ckpt)
        assert isinstance(vae, cls) and vae.kind == ref.kind == kind
        assert vae.latent_channels == ref.latent_channels == lat_ch and vae.downscale == ref.downscale == down
        assert vae.config == ref.config  # the same VAEConfig, resolved by the same code
        w = ref.decoder.conv_in.weight  # OIHW in torch -> OHWI in MLX, converted once at load
        assert vae.decoder.conv_in.weight.shape == (w.shape[0], w.shape[2], w.shape[3], w.shape[1])
        assert np.array_equal(_np(vae.decoder.conv_in.weight), w.permute(0, 2, 3, 1).numpy())


def test_group_count_resolution(refs):
    """Groups are not in the weights: the argument, else metadata `config` / config.json, else 32 (as torch)."""
    path = refs["flux2"]["ldm_noconfig"]
    with pytest.raises(ConfigError, match="norm_num_groups"):
        load_vae(path)  # 32 groups do not divide the tiny widths
    vae = load_vae(path, norm_num_groups=4)
    assert vae.config.norm_num_groups == 4
    z, x = _roundtrip(vae, _image("flux2", batch=1), torch.zeros(1, 16, 3, 5))
    ref = T.load_vae(path, norm_num_groups=4)
    assert rel_err(_np(z), ref.encode(_image("flux2", batch=1))) <= TOL


def test_strict_errors_name_offenders_in_file_layout(refs):
    sd = dict(load_checkpoint(refs["flux1"]["ldm"]).sd)
    del sd["decoder.up.1.block.0.conv2.weight"]
    sd["encoder.conv_in.weight"] = sd["encoder.conv_in.weight"][:, :, :2]
    with pytest.raises(WeightError) as e:
        load_vae(sd, norm_num_groups=4)
    msg = str(e.value)
    assert "decoder.up.1.block.0.conv2.weight" in msg
    assert "encoder.conv_in.weight file (8, 3, 2, 3) vs model (8, 3, 3, 3)" in msg  # OIHW, as in the file


def test_bad_inputs_are_config_errors(refs):
    vae = load_vae(refs["flux2"]["ldm"])
    with pytest.raises(ConfigError, match="multiple of 16"):
        vae.encode(mx.zeros((1, 3, 40, 48)))
    with pytest.raises(ConfigError, match="latents"):
        vae.decode(mx.zeros((1, 16 * 4 + 1, 3, 3)))


def test_bfloat16_as_accurate_as_torch(refs):
    for kind in ("flux2", "flux1"):
        ckpt = load_checkpoint(refs[kind]["ldm"])
        truth, tb, vae = T.load_vae(ckpt), T.load_vae(ckpt, dtype=torch.bfloat16), load_vae(ckpt, "bfloat16")
        assert vae.dtype == mx.bfloat16 and vae.decoder.conv_out.weight.dtype == mx.bfloat16
        if kind == "flux2":  # the BN statistics stay float32
            assert vae.bn.running_mean.dtype == vae.bn.running_var.dtype == mx.float32
        w = tb.encoder.down[0].block[0].conv1.weight.permute(0, 2, 3, 1).contiguous().view(torch.int16).numpy()
        assert np.array_equal(np.array(vae.encoder.down[0].block[0].conv1.weight.view(mx.int16)), w)
        img = _image(kind)
        lat = truth.encode(img)
        z, x = _roundtrip(vae, img, lat)
        assert z.dtype == x.dtype == mx.float32  # latents and images leave in float32
        for ours, theirs, want in ((z, tb.encode(img), lat), (x, tb.decode(lat), truth.decode(lat))):
            err_mlx, err_torch = rel_err(_np(ours), want), rel_err(theirs, want)
            assert err_mlx <= 2 * err_torch + 2e-3, (kind, err_mlx, err_torch)


def _bf16_close(ours, theirs, same: float):
    """Every element within one bf16 rounding step of itself (2^-7 relative) plus half a step of the tensor's largest
    value (sums that cancel), and at least `same` of them bit-identical."""
    a, b = _np(ours), theirs.float().numpy()
    assert (np.abs(a - b) <= 2.0 ** -7 * np.maximum(np.abs(a), np.abs(b)) + 2.0 ** -8 * np.abs(b).max()).all()
    assert (a == b).mean() >= same, (a == b).mean()


def test_bfloat16_blocks_round_where_torch_rounds(refs):
    """Same bf16 inputs: GroupNorm + SiLU (float32 statistics and affine, one rounding) agree bit for bit up to the
    order of the statistics sums; the mid attention (float32 scores, P rounded to bf16, like torch's flash kernel)
    differs by isolated 1-ulp flips."""
    import torch.nn.functional as F

    from flux_core.mlx.common import silu

    ckpt = load_checkpoint(refs["flux2"]["ldm"])
    tb, vae = T.load_vae(ckpt, dtype=torch.bfloat16), load_vae(ckpt, "bfloat16")
    g = torch.Generator().manual_seed(3)
    x = (2 * torch.randn(2, 16, 6, 10, generator=g) + 1).bfloat16()
    with torch.no_grad():
        ours = silu(vae.decoder.mid.block_1.norm1(mx.array(x.float().numpy()).astype(mx.bfloat16).transpose(0, 2, 3, 1)))
        _bf16_close(ours.transpose(0, 3, 1, 2), F.silu(tb.decoder.mid.block_1.norm1(x)), same=0.99)
        q, k, v = (torch.randn(2, 1, 60, 16, generator=g).bfloat16() for _ in range(3))
        ours = attention(*(mx.array(t[:, 0].float().numpy()).astype(mx.bfloat16) for t in (q, k, v)))
        _bf16_close(ours, F.scaled_dot_product_attention(q, k, v)[:, 0], same=0.9)


def test_chunked_attention_equals_one_chunk():
    g = np.random.default_rng(0)
    q, k, v = (mx.array(g.standard_normal((2, 37, 8)).astype(np.float32)) for _ in range(3))
    a, b = attention(q, k, v, chunk=5), attention(q, k, v, chunk=4096)
    s = np.einsum("bqc,bkc->bqk", _np(q), _np(k)) / np.sqrt(8)
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = (p / p.sum(-1, keepdims=True)) @ _np(v)
    assert np.allclose(_np(a), _np(b), atol=1e-6) and np.allclose(_np(b), ref, atol=1e-5)


def test_patchify_matches_torch():
    z = torch.randn(2, 4, 6, 10)
    p = patchify(mx.array(z.numpy()))
    assert np.array_equal(_np(p), T.patchify(z).numpy())
    assert np.array_equal(_np(unpatchify(p)), z.numpy())
