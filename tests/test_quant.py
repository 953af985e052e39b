"""Load-time weight quantization (flux_core/torch/quant.py, flux_core/mlx/quant.py, backend.check_quantization).

Every backend x mode on the tiny demo checkpoints, float32 compute, against the unquantized float32 torch model:
one denoiser step's velocity (bounds per family and precision, measured values next to STEP_TOL), the text encoder's
embeddings, the bytes of parameters + buffers, a whole `pipeline.sample`, and the refusals.
"""
import numpy as np
import pytest
import torch

from conftest import rel_err

from flux_core import backend, demo, models, pipeline
from flux_core.errors import ConfigError
from flux_core.pipeline import Conditioning
from flux_core.torch import quant as TQ
from flux_core.torch import runtime as TR

MODES = ("int8", "int4", "fp8")
# measured (torch | mlx; int8 / int4 are the same codes on both): klein int8 3.0e-3, fp8 1.2e-2 | 1.4e-2, int4
# 8.7e-2 (modulation included); Z-Image int8 1.3e-2, fp8 7.5e-2 | 4.4e-2, int4 2.3e-1 (random tiny weights; a broken
# scale or nibble order gives ~1)
STEP_TOL = {("klein", "int8"): 1e-2, ("klein", "fp8"): 3e-2, ("klein", "int4"): 1.5e-1,
            ("zimage", "int8"): 3e-2, ("zimage", "fp8"): 1.2e-1, ("zimage", "int4"): 3e-1}
# 28 random tiny layers amplify; measured torch | mlx: int8 2.5e-2, fp8 1.2e-1 | 1.1e-1, int4 1.8e-1
TE_TOL = {"int8": 5e-2, "fp8": 2.5e-1, "int4": 3e-1}
H, W = 4, 6
# bytes of the blocks quantized / float32, measured (torch | mlx): klein int8 0.26 | 0.28, fp8 0.26 | 0.26, int4 0.14 |
# 0.16; the tiny Z-Image keeps its 170-wide w2 (not divisible by the group: MLX all modes, torch int4) and the per-block
# adaLN (modulation is never quantized) at float32: 0.42-0.56.
BLOCK_RATIO = {("klein", "int8"): 0.3, ("klein", "fp8"): 0.3, ("klein", "int4"): 0.2,
               ("zimage", "int8"): 0.6, ("zimage", "fp8"): 0.6, ("zimage", "int4"): 0.6}

try:
    import mlx.core as mx
    from flux_core.mlx import quant as MQ, runtime as MR
    from flux_core.mlx.common import to_mx, to_numpy
    from mlx.utils import tree_flatten
    BACKENDS = ("torch", "mlx")
except ImportError:  # torch-only machines still run the torch half
    mx = None
    BACKENDS = ("torch",)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return demo.write_demo_checkpoints(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def reference(paths):
    """The unquantized float32 torch velocities and text embeddings everything is compared with."""
    out = {fam: _velocity(models.load_transformer(paths[fam], backend="torch", dtype="float32"), fam)
           for fam in ("klein", "zimage")}
    out["te"] = _embeds(models.load_text_encoder(paths["text_encoder"], str(paths["tokenizer"]), backend="torch",
                                                 dtype="float32"))
    return out


@pytest.fixture(autouse=True)
def eager():
    if mx is not None:
        mx.disable_compile()  # a compiled graph costs a g++ run per kernel on a Linux CPU (test_mlx_runtime.py)
    yield
    if mx is not None:
        mx.enable_compile()


def _cond(fam):
    g = torch.Generator().manual_seed(0)
    if fam == "klein":
        return Conditioning("klein", torch.randn(1, 512, demo.KLEIN["context_in_dim"], generator=g), ["p"])
    return Conditioning("zimage", [torch.randn(9, demo.ZIMAGE["cap_feat_dim"], generator=g)], ["p"])


def _velocity(model, fam):
    cond, x, t = _cond(fam), torch.randn(1, 16, H, W, generator=torch.Generator().manual_seed(1)), np.float32(0.7)
    if model.backend == "torch":
        return TR.make_denoiser(model, cond, None, 0.0, 1, H, W)(x, t).numpy()
    embeds = to_mx(cond.embeds) if fam == "klein" else [to_mx(e) for e in cond.embeds]
    cond = Conditioning(cond.mode, embeds, cond.prompts)
    return to_numpy(MR.make_denoiser(model, cond, None, 0.0, 1, H, W)(to_mx(x), t))


def _embeds(te):
    e = pipeline.encode_prompt(te, ["a red cat on a mat"], "zimage").embeds[0]
    return e.numpy() if isinstance(e, torch.Tensor) else to_numpy(e)


def _nbytes(module, blocks_only=False) -> int:
    """Bytes of parameters + buffers: of the whole model, or of its repeated blocks (what is quantized)."""
    if isinstance(module, torch.nn.Module):
        parts = [getattr(module, c) for c in TQ.BLOCK_CONTAINERS if hasattr(module, c)] if blocks_only else [module]
        return sum(TQ.module_bytes(p) for p in parts)
    return sum(v.nbytes for k, v in tree_flatten(module.parameters())
               if not blocks_only or k.split(".")[0] in TQ.BLOCK_CONTAINERS)


# ------------------------------------------------------------------------------------------------ accuracy + bytes

@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fam", ["klein", "zimage"])
def test_quantized_transformer_close_and_smaller(paths, reference, be, mode, fam):
    full = models.load_transformer(paths[fam], backend=be, dtype="float32")
    q = models.load_transformer(paths[fam], backend=be, dtype="float32", quantization=mode)
    assert q is not full and q.quantization == mode and mode in q.describe()
    err = rel_err(_velocity(q, fam), reference[fam])
    assert 0 < err < STEP_TOL[fam, mode], (fam, be, mode, err)  # 0 would mean nothing was quantized
    whole, blocks = _nbytes(q.module) / _nbytes(full.module), _nbytes(q.module, True) / _nbytes(full.module, True)
    print(f"{fam} {be} {mode}: step error {err:.3g}, bytes {whole:.3f} of float32 ({blocks:.3f} in the blocks)")
    assert whole < 0.9 and blocks < BLOCK_RATIO[fam, mode], blocks


def test_torch_layer_bytes_and_layout(paths):
    """int8 / fp8 weights take 1/4 of float32 (+ one float32 scale per row), int4 1/8 (+ one float16 per 64); the block
    Linears are replaced, the modulation / input / output Linears are not."""
    full = models.load_transformer(paths["klein"], backend="torch", dtype="float32").module
    lin = full.double_blocks[0].img_attn.qkv
    for mode, ratio in (("int8", 1 / 4), ("fp8", 1 / 4), ("int4", 1 / 8)):
        q = models.load_transformer(paths["klein"], backend="torch", dtype="float32", quantization=mode).module
        ql = q.double_blocks[0].img_attn.qkv
        assert isinstance(ql, TQ.QuantLinear) and ql.weight.dtype == {"int8": torch.int8, "fp8": torch.float8_e4m3fn,
                                                                    "int4": torch.uint8}[mode]
        scale_bytes = ql.weight_scale.numel() * ql.weight_scale.element_size()
        assert TQ.module_bytes(ql) == pytest.approx(TQ.module_bytes(lin) * ratio + scale_bytes)
        mod_type = TQ.QuantLinear if mode == "int4" else torch.nn.Linear  # int4 quantizes the shared modulation
        assert type(q.double_stream_modulation_img.lin) is mod_type and type(q.img_in) is torch.nn.Linear
        assert type(q.final_layer.linear) is torch.nn.Linear
        # dequantized weight close to the original: a broken scale or nibble order is far off
        w = lin.weight.detach()
        assert rel_err(ql.dequantize(torch.float32), w) < {"int8": 1e-2, "fp8": 7e-2, "int4": 0.15}[mode]


@pytest.mark.parametrize("be", BACKENDS)
def test_quantized_text_encoder(paths, reference, be):
    for mode in MODES:
        te = models.load_text_encoder(paths["text_encoder"], str(paths["tokenizer"]), backend=be, dtype="float32",
                                      quantization=mode)
        err = rel_err(_embeds(te), reference["te"])
        assert 0 < err < TE_TOL[mode], (be, mode, err)
    if be == "torch":
        enc = te.module.model
        assert isinstance(enc.layers[0].mlp.down_proj, TQ.QuantLinear) and type(enc.embed_tokens) is torch.nn.Embedding


# ------------------------------------------------------------------------------------------------ whole runs

@pytest.mark.parametrize("be,fam,mode", [("torch", "klein", "int4"), ("torch", "zimage", "fp8"),
                                         ("mlx", "klein", "fp8"), ("mlx", "zimage", "int8")])
@pytest.mark.slow
def test_sample_with_quantized_model(paths, be, fam, mode):
    if be not in BACKENDS:
        pytest.skip("mlx is not installed")
    full = models.load_transformer(paths[fam], backend="torch", dtype="float32")
    q = models.load_transformer(paths[fam], backend=be, dtype="float32", quantization=mode)
    cond = _cond(fam)
    if be == "mlx":
        cond = Conditioning(cond.mode, to_mx(cond.embeds) if fam == "klein" else [to_mx(e) for e in cond.embeds],
                            cond.prompts)
    got = backend.impl(be, "runtime").to_numpy(pipeline.sample(q, cond, width=64, height=48, steps=2, seed=3).latent)
    want = pipeline.sample(full, _cond(fam), width=64, height=48, steps=2, seed=3).latent.numpy()
    assert got.shape == want.shape and np.isfinite(got).all()
    assert rel_err(got, want) < 2 * STEP_TOL[fam, mode]


# ------------------------------------------------------------------------------------------------ refusals

def test_unknown_quantization_names_the_choices():
    with pytest.raises(ConfigError, match="int8, int4, fp8"):
        backend.check_quantization("int2", backend.choose("torch", "cpu"))


@pytest.mark.skipif(mx is None, reason="mlx is not installed")
def test_mlx_without_mxfp8_refuses_fp8(paths, monkeypatch):
    assert "fp8" in backend.supported_quantizations(backend.choose("mlx", "cpu"))  # mlx 0.32 has mxfp8
    monkeypatch.setattr(MQ, "has_mxfp8", lambda: False)
    with pytest.raises(ConfigError, match="choose one of none, int8, int4$"):
        models.load_transformer(paths["zimage"], backend="mlx", dtype="float32", quantization="fp8")
    with pytest.raises(ConfigError, match="not available on MLX"):
        MQ.quantize_model(object(), "fp8")


@pytest.mark.slow
def test_cli_generate_with_quantization(paths, tmp_path):
    from flux_core.__main__ import main

    out = tmp_path / "q.png"
    assert main(["generate", "--model", str(paths["klein"]), "--text-encoder", str(paths["text_encoder"]),
                 "--vae", str(paths["flux2_vae"]), "--tokenizer", str(paths["tokenizer"]), "--prompt", "a cat",
                 "--width", "64", "--height", "64", "--steps", "2", "--seed", "1", "--backend", "torch",
                 "--dtype", "float32", "--quantization", "int8", "--output", str(out)]) == 0
    assert out.exists()
    assert any(m.quantization == "int8" and m.kind == "transformer" for m in models.cached_models())
