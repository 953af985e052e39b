"""Z-Image transformer on MLX == our torch transformer (== diffusers) at the tiny config of docs/MODELS.md §X.

Tolerances (rel = max|a - b| / max|b|):
  float32  <= 1e-4 against our torch model and against diffusers (measured <= 1.8e-6: the tiny model's sandwich
           norms with weights 1 +- 0.2 amplify kernel-order round-off more than klein's).
  bfloat16 against torch on the same (bit-identical) bf16 weights: MLX-bf16 vs torch-float32 no worse than
           torch-bf16 vs torch-float32 (+25 %; measured 1.80e-2 vs 1.59e-2), and MLX-bf16 vs torch-bf16 <= 2**-5
           (measured 1.2e-2: dozens of bf16 roundings deep, the two backends' roundings drift a few ulps apart). See
           tests/test_mlx_klein.py for why a uniform 2e-3 cannot hold in bf16.
"""
import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")

from conftest import rel_err  # noqa: E402
from refs import zimage as R  # noqa: E402

from flux_core.errors import ConfigError, WeightError  # noqa: E402
from flux_core.mlx import zimage as MZ  # noqa: E402
from flux_core.mlx.common import to_mx, to_numpy  # noqa: E402
from flux_core.torch import zimage as TZ  # noqa: E402
from flux_core.weights.io import Checkpoint, load_checkpoint  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

TOL = 1e-4
C, CAP = 16, 32


@pytest.fixture(scope="module")
def ref():
    return R.build_reference(seed=0)


@pytest.fixture(scope="module")
def files(ref, tmp_path_factory):
    return R.save_layouts(ref, tmp_path_factory.mktemp("mlx_zimage"))


@pytest.fixture(scope="module")
def torch_model(files):
    return TZ.load_zimage(files["original"])


@pytest.fixture(scope="module")
def mlx_model(files):
    return MZ.load_zimage(files["prefixed"])


def _inputs(b, h, w, lens, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, C, h, w, generator=g), torch.rand(b, generator=g), [torch.randn(n, CAP, generator=g)
                                                                              for n in lens]


def _torch(model, x, t, caps):
    with torch.no_grad():
        return model(x, t, caps).float().numpy()


def _mlx(model, x, t, caps, **kw):
    return to_numpy(model(to_mx(x), to_mx(t), [to_mx(c) for c in caps], **kw))


# ------------------------------------------------------------------------------------------------ loading

@pytest.mark.parametrize("layout", ["diffusers", "original", "prefixed"])
def test_every_layout_loads_the_torch_weights(files, torch_model, layout):
    model = MZ.load_zimage(files[layout])
    assert model.config == torch_model.config
    got = dict(tree_flatten(model.parameters()))
    want = torch_model.state_dict()
    assert set(got) == set(want)  # same attribute names, so the two files diff cleanly
    assert all(np.array_equal(to_numpy(got[k]), want[k].numpy()) for k in want)


def test_strict_loading_names_the_offender(files):
    sd = dict(load_checkpoint(files["prefixed"]).sd)
    sd["model.diffusion_model.layers.0.attention.out.bias"] = torch.zeros(64)
    with pytest.raises(WeightError, match=r"unexpected keys.*layers\.0\.attention\.out\.bias"):
        MZ.load_zimage(Checkpoint(sd))


# ------------------------------------------------------------------------------------------------ parity

@pytest.mark.parametrize("b,h,w,lens", [
    (1, 8, 8, [7]),          # 16 patches -> 32 (image pads); caption 7 -> 32 (caption pads)
    (1, 6, 10, [32]),        # caption exactly 32: no caption pad
    (1, 16, 12, [45]),       # 48 patches -> 64, caption 45 -> 64
    (2, 8, 10, [5, 40]),     # batch 2, padded lengths 32 and 64: batch-padding masks
    (2, 8, 8, [20, 30]),     # batch 2, both pad to 32: no mask
])
def test_float32_parity(ref, torch_model, mlx_model, b, h, w, lens):
    x, t, caps = _inputs(b, h, w, lens, seed=b + h + len(lens))
    want = _torch(torch_model, x, t, caps)
    got = _mlx(mlx_model, x, t, caps)
    assert got.shape == want.shape == (b, C, h, w)
    assert rel_err(got, want) <= TOL
    assert rel_err(got, R.reference_forward(ref, x, t, caps)) <= TOL


def test_rope_tables_equal_torch_and_cache_is_checked(torch_model, mlx_model):
    want = torch_model.make_rope([5, 40], 16, 12)
    got = mlx_model.make_rope([5, 40], 16, 12)
    for name in ("img", "cap", "joint"):
        for a, b in zip(getattr(got, name), getattr(want, name)):
            assert np.abs(to_numpy(a) - b.numpy()).max() <= 6e-8, name  # one float32 ulp of cos / sin at most
    assert np.array_equal(np.array(got.joint_mask), want.joint_mask.numpy())
    assert np.array_equal(np.array(got.cap_mask), want.cap_mask.numpy())
    for ours, theirs in zip(MZ.position_ids(32, 2, 3), TZ.position_ids(32, 2, 3)):
        assert np.array_equal(ours, theirs.numpy())
    x, t, caps = _inputs(2, 16, 12, [5, 40])
    assert np.array_equal(_mlx(mlx_model, x, t, caps, rope_cache=got), _mlx(mlx_model, x, t, caps))
    with pytest.raises(ConfigError, match="rope_cache"):
        _mlx(mlx_model, x, t, caps[::-1], rope_cache=got)


def test_patchify_matches_torch():
    x = torch.randn(2, C, 4, 6)
    tok = MZ.patchify(to_mx(x), 2)
    assert np.array_equal(to_numpy(tok), TZ.patchify(x, 2).numpy())
    assert np.array_equal(to_numpy(MZ.unpatchify(tok, 4, 6, 2)), x.numpy())


def test_bfloat16(files, torch_model):
    mb, tb = MZ.load_zimage(files["original"], "bfloat16"), TZ.load_zimage(files["original"], dtype=torch.bfloat16)
    params = dict(tree_flatten(mb.parameters()))
    assert all(p.dtype == mx.bfloat16 for p in params.values())
    assert all(torch.equal(torch.from_numpy(to_numpy(params[k])), v.float()) for k, v in tb.state_dict().items())
    x, t, caps = _inputs(2, 8, 10, [5, 40], seed=4)
    f32 = _torch(torch_model, x, t, caps)
    got, torch_bf16 = _mlx(mb, x, t, caps), _torch(tb, x, t, caps)
    assert got.dtype == np.float32
    assert rel_err(got, f32) <= 1.25 * rel_err(torch_bf16, f32)
    assert rel_err(got, torch_bf16) <= 2 ** -5
