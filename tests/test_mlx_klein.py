"""FLUX.2 [klein] transformer on MLX == our torch transformer (== diffusers) at the tiny config of docs/MODELS.md §X.

Tolerances (rel = max|a - b| / max|b|):
  float32  <= 1e-4 against our torch model and against diffusers. Same math, different kernels (MLX vs torch matmul /
           SDPA / exp); measured ~3e-7.
  bfloat16 two numbers, both against torch on the SAME bf16 weights (bit-identical after loading):
           (a) MLX-bf16 vs torch-float32, must be no worse than torch-bf16 vs torch-float32 (+25 %): the MLX bf16 path
               loses no more accuracy than the torch bf16 path (measured 6.1e-3 for both);
           (b) MLX-bf16 vs torch-bf16 <= 2**-7 (two bf16 ulps at the output's largest value; measured 3.3e-3 = one ulp).
           A uniform 2e-3 is below one bf16 rounding of the output (2**-9 relative to each value, 2**-8 between two
           independent roundings), so it cannot hold for any two bf16 implementations that are not bit-identical.
"""
import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")

from conftest import rel_err  # noqa: E402
from refs import klein as R  # noqa: E402

from flux_core.errors import WeightError  # noqa: E402
from flux_core.mlx import klein as MK  # noqa: E402
from flux_core.mlx.common import to_mx, to_numpy  # noqa: E402
from flux_core.torch import klein as TK  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    return R.build_reference(seed=0)


@pytest.fixture(scope="module")
def files(ref, tmp_path_factory):
    d = tmp_path_factory.mktemp("mlx_klein")
    return {
        "bfl": R.save_bfl(ref, d / "klein.safetensors"),
        "comfy": R.save_bfl(ref, d / "klein_comfy.safetensors", prefix="model.diffusion_model.", norm_suffix="weight"),
        "diffusers": R.save_diffusers(ref, d / "pipeline"),
    }


@pytest.fixture(scope="module")
def torch_model(files):
    return TK.load_klein(files["bfl"])


@pytest.fixture(scope="module")
def mlx_model(files):
    return MK.load_klein(files["comfy"])


def _torch(model, x, **kw):
    with torch.no_grad():
        return model(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], **kw).float().numpy()


def _mlx(model, x, **kw):
    """The same inputs as MLX arrays (ids may stay torch / numpy: they only feed the host-side RoPE table)."""
    out = model(to_mx(x["img"]), x["img_ids"], to_mx(x["txt"]), x["txt_ids"], to_mx(x["timesteps"]), **kw)
    return to_numpy(out)


# ------------------------------------------------------------------------------------------------ loading

@pytest.mark.parametrize("layout", ["bfl", "comfy", "diffusers"])
def test_every_layout_loads_the_torch_weights(files, torch_model, layout):
    model = MK.load_klein(files[layout])
    assert model.config == torch_model.config
    got = dict(tree_flatten(model.parameters()))
    want = torch_model.state_dict()
    assert set(got) == set(want)  # same attribute names, so the two files diff cleanly
    assert all(np.array_equal(to_numpy(got[k]), want[k].numpy()) for k in want)


def test_strict_loading_names_the_offender(ref):
    sd = {"model.diffusion_model." + k: v for k, v in R.diffusers_to_bfl(ref.state_dict()).items()}
    broken = dict(sd)
    del broken["model.diffusion_model.double_blocks.1.txt_mlp.2.weight"]
    with pytest.raises(WeightError, match=r"missing keys \(1\): double_blocks\.1\.txt_mlp\.2\.weight"):
        MK.load_klein(broken)
    broken = dict(sd, **{"model.diffusion_model.double_blocks.0.img_attn.proj.weight": torch.zeros(64, 65)})
    with pytest.raises(WeightError, match=r"img_attn\.proj\.weight file \(64, 65\) vs model \(64, 64\)"):
        MK.load_klein(broken)


# ------------------------------------------------------------------------------------------------ parity

@pytest.mark.parametrize("refs,batch", [
    ((), 1),
    ((), 2),
    (((2, 3),), 1),                # one reference image, t = 10
    (((2, 3), (4, 2)), 2),         # two references of different sizes, t = 10, 20, batch 2
])
def test_float32_parity(ref, torch_model, mlx_model, refs, batch):
    x = R.inputs(n_img=(3, 5), n_txt=7, batch=batch, refs=refs, seed=batch + len(refs))
    want = _torch(torch_model, x)
    got = _mlx(mlx_model, x)
    assert got.shape == want.shape == (batch, x["img"].shape[1], 16)
    assert rel_err(got, want) <= TOL
    assert rel_err(got, R.reference_forward(ref, x)) <= TOL


def test_reference_tokens_matter(mlx_model):
    """Control for the parity test: dropping the reference tokens must change the noise rows."""
    x = R.inputs(refs=((2, 3),), seed=5)
    plain = dict(x, img=x["img"][:, :15], img_ids=x["img_ids"][:15])
    assert np.abs(_mlx(mlx_model, x)[:, :15] - _mlx(mlx_model, plain)).max() > 1e-3


def test_rope_table_equals_torch_and_reuse_is_identical(mlx_model):
    img = torch.cat([TK.position_ids(3, 4), TK.position_ids(2, 2, t=10)])
    txt = TK.text_ids(5)
    pe = MK.rope_table(img, txt, (32, 32, 32, 32), 2000.0)
    want = TK.rope_table(img, txt, (32, 32, 32, 32), 2000.0).numpy()
    assert pe.dtype == mx.float32 and pe.shape == want.shape
    assert np.abs(to_numpy(pe) - want).max() <= 6e-8  # float64 cos/sin rounded to float32: at most one ulp apart
    assert np.array_equal(MK.position_ids(3, 4), TK.position_ids(3, 4).numpy())
    assert np.array_equal(MK.text_ids(5), TK.text_ids(5).numpy())
    x = R.inputs(refs=((2, 2),), batch=2, seed=7)
    pe = mlx_model.make_pe(x["img_ids"], x["txt_ids"])
    assert np.array_equal(_mlx(mlx_model, x, pe=pe), _mlx(mlx_model, x))


def test_guidance_embedder_variant():
    ref = R.build_reference(seed=1, guidance_embeds=True)
    tm, mm = TK.load_klein(ref.state_dict()), MK.load_klein(ref.state_dict())
    assert mm.config.guidance_embed and "guidance_in" in mm
    x = R.inputs(seed=2)
    g = torch.tensor([3.5])
    assert rel_err(_mlx(mm, x, guidance=to_mx(g)), _torch(tm, x, guidance=g)) <= TOL


def test_bfloat16(files, torch_model):
    mb, tb = MK.load_klein(files["bfl"], "bfloat16"), TK.load_klein(files["bfl"], dtype=torch.bfloat16)
    params = dict(tree_flatten(mb.parameters()))
    assert all(p.dtype == mx.bfloat16 for p in params.values())
    # both backends hold bit-identical bf16 weights (the same round-to-nearest-even from float32)
    assert all(torch.equal(torch.from_numpy(to_numpy(params[k])), v.float()) for k, v in tb.state_dict().items())
    x = R.inputs(n_img=(3, 5), n_txt=7, batch=2, refs=((2, 3),), seed=3)
    f32 = _torch(torch_model, x)
    got, torch_bf16 = _mlx(mb, x), _torch(tb, x)
    assert rel_err(got, f32) <= 1.25 * rel_err(torch_bf16, f32)
    assert rel_err(got, torch_bf16) <= 2 ** -7
