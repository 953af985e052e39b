"""The MLX sampler runtime (flux_core/mlx/runtime.py) and weight conversion (flux_core/mlx/common.py).

End to end through `pipeline.sample` on the tiny demo checkpoints (`flux_core.demo`), MLX vs the torch path, float32,
same seed (noise drawn once by torch's CPU generator and handed to both): final latents <= 1e-3 relative (measured
~1e-6; the per-step error is round-off, so 2-3 steps cannot amplify it to anything near the bound).

Most tests switch `mx.compile` off (`eager` fixture): on a Linux CPU every compiled graph costs a g++ -O3 run per fused
kernel the first time (~25 s for the tiny klein step on 2 cores, cached in $TMPDIR/mlx/ afterwards), and compiling does
not change what is computed. `test_compiled_step...` runs it compiled, once, and checks it against the eager result.
"""
import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")

from conftest import rel_err  # noqa: E402

from flux_core import demo, models, pipeline  # noqa: E402
from flux_core.backend import impl  # noqa: E402
from flux_core.mlx import klein as MK, runtime as MR, zimage as MZ  # noqa: E402
from flux_core.mlx.common import to_mx, to_numpy  # noqa: E402
from flux_core.pipeline import Conditioning  # noqa: E402
from flux_core.torch import runtime as TR  # noqa: E402
from flux_core.weights.io import load_checkpoint, save_safetensors  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

E2E_TOL = 1e-3
CTX, CAP = demo.KLEIN["context_in_dim"], demo.ZIMAGE["cap_feat_dim"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return demo.write_demo_checkpoints(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def loaded(paths):
    """{(name, backend): LoadedModel}, float32, through the public loader (the backend dispatcher calls ours)."""
    out = {}
    for name in ("klein", "klein_base", "zimage"):
        for backend in ("torch", "mlx"):
            out[name, backend] = models.load_transformer(paths[name], backend=backend, dtype="float32")
    return out


@pytest.fixture
def eager():
    mx.disable_compile()
    yield
    mx.enable_compile()


def _cond(kind, batch, seed, lens=(7,)):
    g = torch.Generator().manual_seed(seed)
    if kind == "klein":
        return Conditioning("klein", torch.randn(batch, 512, CTX, generator=g), ["p"] * batch)
    return Conditioning("zimage", [torch.randn(n, CAP, generator=g) for n in lens], ["p"] * batch)


def _refs(cond, sizes, seed):
    g = torch.Generator().manual_seed(seed)
    for h, w in sizes:  # native reference latents [1, 16, h, w]
        cond = cond.with_reference(torch.randn(1, demo.KLEIN["in_channels"], h, w, generator=g))
    return cond


def _as_mx(cond):
    """The same conditioning as an MLX text encoder / VAE would hand it over (mx arrays)."""
    embeds = to_mx(cond.embeds) if cond.mode == "klein" else [to_mx(e) for e in cond.embeds]
    return Conditioning(cond.mode, embeds, cond.prompts, [to_mx(r) for r in cond.refs])


def _sample(model, cond, uncond, **kw):
    res = pipeline.sample(model, cond, uncond, seed=7, **kw)
    return impl(model.backend, "runtime").to_numpy(res.latent)


SCENARIOS = {  # name: (model, cond, uncond, sample kwargs)
    "klein_t2i": ("klein", lambda: (_cond("klein", 1, 0), None), dict(width=64, height=96, steps=3)),
    "klein_refs_batch2": ("klein", lambda: (_refs(_cond("klein", 2, 1), [(2, 3), (4, 2)], 2), None),
                          dict(width=64, height=64, steps=2)),
    "klein_base_cfg": ("klein_base", lambda: (_refs(_cond("klein", 1, 3), [(3, 3)], 4), _cond("klein", 1, 5)),
                       dict(width=48, height=64, steps=2, guidance=4.0)),
    "zimage_g0": ("zimage", lambda: (_cond("zimage", 1, 6, (7,)), None), dict(width=64, height=48, steps=3)),
    "zimage_cfg_batch2": ("zimage", lambda: (_cond("zimage", 2, 7, (5, 33)), _cond("zimage", 2, 8, (40, 40))),
                          dict(width=64, height=64, steps=2, guidance=1.5)),
}


# ------------------------------------------------------------------------------------------------ end to end

@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_sample_equals_torch_path(loaded, eager, scenario):
    name, conds, kw = SCENARIOS[scenario]
    cond, uncond = conds()
    if uncond is not None and cond.refs:
        uncond = Conditioning(uncond.mode, uncond.embeds, uncond.prompts, cond.refs)  # as pipeline.generate does
    want = _sample(loaded[name, "torch"], cond, uncond, **kw)
    got = _sample(loaded[name, "mlx"], cond, uncond, **kw)
    assert got.shape == want.shape and got.dtype == np.float32
    assert rel_err(got, want) <= E2E_TOL


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["klein_refs_batch2", "zimage_cfg_batch2"])
def test_bfloat16_sample(paths, loaded, eager, scenario):
    """bf16 end to end, against the float32 torch path: <= 2e-2 relative (measured: klein 5.9e-3, Z-Image 1.4e-2;
    torch's own bf16 path 4.6e-3 / 1.8e-2). Catches cast-point drift between the backends, e.g. rounding σ to bf16
    on one side only moves klein's tiny output by 8e-2."""
    name, conds, kw = SCENARIOS[scenario]
    cond, uncond = conds()
    want = _sample(loaded[name, "torch"], cond, uncond, **kw)
    mb = models.load_transformer(paths[name], backend="mlx", dtype="bfloat16")
    assert rel_err(_sample(mb, cond, uncond, **kw), want) <= 2e-2


def test_denoiser_step_equals_torch(loaded, eager):
    """One step in isolation, tighter than end to end: velocity <= 1e-4 relative, both conventions, with the
    conditioning handed over as mx arrays (as the MLX text encoder and VAE produce it)."""
    for name, cond, h, w in (("klein", _refs(_cond("klein", 1, 9), [(2, 2)], 9), 3, 4),
                             ("zimage", _cond("zimage", 1, 9, (11,)), 6, 8)):
        x = torch.randn(1, 16, h, w, generator=torch.Generator().manual_seed(1))
        t = np.float32(0.7)
        v_t = TR.make_denoiser(loaded[name, "torch"], cond, None, 0.0, 1, h, w)(x, t)
        v_m = MR.make_denoiser(loaded[name, "mlx"], _as_mx(cond), None, 0.0, 1, h, w)(to_mx(x), t)
        assert rel_err(to_numpy(v_m), v_t.numpy()) <= 1e-4, name


def test_one_evaluation_per_step_and_rope_once(loaded, eager, monkeypatch):
    """Exactly one mx.eval per denoising step (in step_done), and the RoPE tables built once per generation.

    Inside a compiled step MLX itself forbids any evaluation (it raises), so counting mx.eval covers the rest."""
    evals, ropes = [], []
    real_eval, real_table, real_make_rope = mx.eval, MK.rope_table, MZ.ZImageTransformer.make_rope
    monkeypatch.setattr(mx, "eval", lambda *a: (evals.append(1), real_eval(*a))[1])
    monkeypatch.setattr(MK, "rope_table", lambda *a: (ropes.append("klein"), real_table(*a))[1])
    monkeypatch.setattr(MZ.ZImageTransformer, "make_rope",
                        lambda self, *a: (ropes.append("zimage"), real_make_rope(self, *a))[1])
    for scenario in ("klein_base_cfg", "zimage_cfg_batch2"):
        name, conds, kw = SCENARIOS[scenario]
        cond, uncond = conds()
        per_step = []
        evals.clear(), ropes.clear()
        pipeline.sample(loaded[name, "mlx"], cond, uncond, seed=1, callback=lambda i, n, x: per_step.append(len(evals)),
                        **dict(kw, steps=3))
        assert np.diff(per_step).tolist() == [1, 1], scenario
        assert len(ropes) == 1, scenario  # one table for the batched [pos; neg] rows (CFG is one forward on both)


@pytest.mark.slow
def test_compiled_step_equals_eager(loaded, monkeypatch):
    """The compiled step (as run for real) gives the eager result (compile fuses kernels, it must not change the
    math), and it is traced once per generation: the time goes in as an mx array (a Python float would be a
    compile-time constant and retrace every step). klein's CFG runs [pos; neg] as one forward."""
    name, conds, kw = SCENARIOS["klein_base_cfg"]
    cond, uncond = conds()
    uncond = Conditioning(uncond.mode, uncond.embeds, uncond.prompts, cond.refs)
    calls = []
    forward = MK.Flux2Transformer.__call__
    monkeypatch.setattr(MK.Flux2Transformer, "__call__",
                        lambda self, *a, **k: (calls.append(1), forward(self, *a, **k))[1])
    compiled = _sample(loaded[name, "mlx"], cond, uncond, **kw)
    assert len(calls) == 1  # one trace for both steps
    mx.disable_compile()
    try:
        eager_out = _sample(loaded[name, "mlx"], cond, uncond, **kw)
    finally:
        mx.enable_compile()
    assert len(calls) == 1 + kw["steps"]
    assert rel_err(compiled, eager_out) <= 1e-5


# ------------------------------------------------------------------------------------------------ arrays

def test_initial_latent_matches_torch(loaded):
    g = torch.Generator().manual_seed(3)
    noise, init = torch.randn(1, 16, 4, 6, generator=g), torch.randn(1, 16, 4, 6, generator=g)
    sigma = np.float32(0.6875)
    for init_latent in (None, init, to_mx(init)):
        want = TR.initial_latent(noise, init if init_latent is not None else None, sigma, loaded["klein", "torch"])
        got = MR.initial_latent(noise, init_latent, sigma, loaded["klein", "mlx"])
        assert got.dtype == mx.float32 and np.array_equal(to_numpy(got), want.numpy())


def test_array_conversions_are_exact():
    t = torch.randn(3, 5)
    b = t.bfloat16()
    for src, want in ((t, t), (t.numpy(), t), (b, b.float()), (to_mx(b), b.float())):
        got = MR.to_backend(src)
        assert got.dtype == mx.float32 and np.array_equal(to_numpy(got), want.numpy())
    a = to_mx(t)
    out = MR.to_numpy(a)
    out[:] = 0  # a copy, not a writable view into MLX memory
    assert np.array_equal(to_numpy(a), t.numpy())


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("target", ["float32", "bfloat16", "float16"])
def test_weight_conversion_rounds_like_torch(target):
    """Every stored dtype (incl. F8_E5M2 and F64, which mx.load refuses) -> every compute dtype, bit for bit as
    torch's `.to(dtype)` (what the torch path does), so both backends hold the same weights."""
    from flux_core.torch.loaders import torch_dtype

    base = torch.randn(64, 33, generator=torch.Generator().manual_seed(0)) * 3
    for src in DTYPES:
        t = base.to(src)
        got = to_mx(t, target)
        assert str(got.dtype).endswith(target), (src, target)
        assert torch.equal(torch.from_numpy(to_numpy(got)), t.to(torch_dtype(target)).float()), (src, target)


def test_checkpoint_with_any_dtype_loads(paths, tmp_path):
    """A file mixing F8_E5M2, F8_E4M3, F64, F16 and BF16 tensors loads on MLX with the torch path's weights."""
    sd = load_checkpoint(paths["klein"]).sd
    kinds = [torch.float8_e5m2, torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn]
    mixed = {k: v.to(kinds[i % len(kinds)]) for i, (k, v) in enumerate(sorted(sd.items()))}
    save_safetensors(mixed, tmp_path / "mixed.safetensors")
    tm = models.load_transformer(tmp_path / "mixed.safetensors", backend="torch", dtype="bfloat16").module
    mm = models.load_transformer(tmp_path / "mixed.safetensors", backend="mlx", dtype="bfloat16").module
    got = dict(tree_flatten(mm.parameters()))
    assert all(torch.equal(torch.from_numpy(to_numpy(got[k])), v.float()) for k, v in tm.state_dict().items())


def test_loader_releases_the_checkpoint(paths, loaded):
    """loaders.load_transformer converts tensor by tensor and drops the host copies (peak: one model, not two)."""
    from flux_core.families import FAMILIES
    from flux_core.mlx import loaders

    for name in ("klein", "zimage"):
        ckpt = load_checkpoint(paths[name])
        model = loaders.load_transformer(FAMILIES[name], ckpt, "float32", "cpu")
        assert ckpt.sd == {}
        want = loaded[name, "torch"].module.state_dict()
        got = dict(tree_flatten(model.parameters()))
        assert all(np.array_equal(to_numpy(got[k]), v.numpy()) for k, v in want.items())
