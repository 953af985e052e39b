"""Tiled VAE decode / encode (flux_core/tiling.py + both VAEs): the plan, tiled vs untiled, MLX tiled vs torch tiled.

Tolerance, measured on the tiny random-weight VAEs of tests/refs/vae.py at 256x256 with 64-px tiles (32-px overlap),
a smooth test image: decode mean |diff| 0.056 (FLUX.2) / 0.064 (FLUX.1) on the 0..1 pixel scale, encode mean |diff|
0.085 / 0.061 on latents of std ~1; with 128-px tiles 0.041 / 0.040 and 0.046 / 0.033. The difference is not at the
seams (the ramps hide those) but everywhere: each tile's GroupNorms see only that tile's statistics, which random
weights amplify far more than a trained VAE does (the same approach as diffusers' and ComfyUI's tiled VAE; the
latent-scale mid block, with its attention, runs untiled). Bounds below are ~1.5x the measured values.
MLX tiled == torch tiled to 1e-4 relative (the untiled MLX/torch tolerance of tests/test_mlx_vae.py).
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from flux_core import tiling
from flux_core.errors import ConfigError
from flux_core.torch.vae import load_vae
from refs import vae as R

SIZE, TILE = 256, 64
BOUNDS = {("flux2", "decode"): 0.085, ("flux1", "decode"): 0.095, ("flux2", "encode"): 0.13, ("flux1", "encode"): 0.095}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return {kind: R.save_layouts(R.build_reference(kind), kind, tmp_path_factory.mktemp(kind))["ldm"]
            for kind in ("flux2", "flux1")}


def _smooth_image(seed=0, size=SIZE):
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(1, 3, 16, 16, generator=g), size=(size, size), mode="bilinear")


def test_spans_cover_and_overlap():
    assert tiling.spans(32, 64, 8) == [(0, 32)]
    for length, tile, overlap in [(32, 8, 4), (100, 24, 6), (128, 96, 8), (33, 8, 3)]:
        s = tiling.spans(length, tile, overlap)
        assert s[0][0] == 0 and s[-1][1] == length and all(b - a == tile for a, b in s)
        assert all(s[i][1] - s[i + 1][0] >= overlap for i in range(len(s) - 1))
    with pytest.raises(ConfigError, match="smaller than the tile"):
        tiling.spans(100, 8, 8)


def test_ramps_sum_to_one_where_overlaps_match():
    # 4 tiles of 8 with stride 6 over 26: every overlap is exactly 2 latent units = 16 output units at scale 8
    spans = tiling.spans(26, 8, 2)
    assert [a for a, _ in spans] == [0, 6, 12, 18]
    total = np.zeros(26 * 8)
    for a, b in spans:
        total[a * 8:b * 8] += tiling.ramp((a, b), 26, 16, 8)
    assert np.allclose(total, 1.0)
    w = tiling.ramp((0, 8), 26, 16, 8)
    assert w[0] == 1.0 and 0 < w[-1] < 0.05  # border side flat, neighbour side ramps down


def test_resolve_tile_rules():
    assert tiling.resolve_tile("off", 4096, 4096) is None
    assert tiling.resolve_tile("auto", 1024, 1024) is None                     # 1 MP, memory unknown
    assert tiling.resolve_tile("auto", 2048, 2048) == tiling.DEFAULT_TILE       # 4 MP
    assert tiling.resolve_tile("auto", 1024, 1024, 2, free_bytes=int(1e9)) == 384  # 2.6 GB needed, 1 GB free
    assert tiling.resolve_tile("512", 1024, 1024) == 512 and tiling.resolve_tile(0, 1024, 1024) is None
    assert tiling.resolve_tile(2048, 1024, 1024) is None                        # one tile = untiled
    with pytest.raises(ConfigError, match="auto, off"):
        tiling.parse_option("big")
    with pytest.raises(ConfigError, match="multiple of 8"):
        tiling.decode_geometry(60)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["flux2", "flux1"])
def test_tiled_within_tolerance_of_untiled(paths, kind):
    vae = load_vae(paths[kind])
    img = _smooth_image()
    z = vae.encode(img)
    zt = vae.encode(img, tile=TILE)
    err = (zt - z).abs().mean().item()
    assert 0 < err <= BOUNDS[(kind, "encode")], err
    x, xt = vae.decode(z), vae.decode(z, tile=TILE)
    err = (xt - x).abs().mean().item()
    assert 0 < err <= BOUNDS[(kind, "decode")], err


@pytest.mark.parametrize("kind", ["flux2", "flux1"])
def test_one_tile_is_the_untiled_pass(paths, kind):
    vae = load_vae(paths[kind])
    img = _smooth_image(size=128)
    z = vae.encode(img)
    assert torch.equal(vae.encode(img, tile=128), z) and torch.equal(vae.decode(z, tile=128), vae.decode(z))
    assert not torch.equal(vae.decode(z, tile=64), vae.decode(z))  # and a real tiling is not


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["flux2", "flux1"])
def test_mlx_tiled_equals_torch_tiled(paths, kind):
    pytest.importorskip("mlx.core")
    from flux_core.mlx.vae import load_vae as load_mlx

    tv, mv = load_vae(paths[kind]), load_mlx(paths[kind])
    img = _smooth_image(1, size=128)  # 3 x 3 tiles of 64 px: every kind of seam, a quarter of the work
    z_t = tv.encode(img, tile=TILE)
    z_m = np.array(mv.encode(img.numpy(), tile=TILE))
    assert rel_err(z_m, z_t) <= 1e-4, rel_err(z_m, z_t)
    x_t = tv.decode(z_t, tile=TILE)
    x_m = np.array(mv.decode(z_t.numpy(), tile=TILE))
    assert rel_err(x_m, x_t) <= 1e-4, rel_err(x_m, x_t)
