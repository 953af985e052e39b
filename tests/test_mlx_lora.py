"""LoRA merging on MLX equals the torch merge (float32, ≤ 1e-6 relative) for every fixture format, and quantized
layers on both backends re-quantize from their kept original (restore is bit-exact)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from lora_fixtures import expected_weights
from test_lora import KLEIN_FORMATS, ZIMAGE_FORMATS, _build

mx = pytest.importorskip("mlx.core")

from flux_core import models  # noqa: E402
from flux_core.mlx import lora as ML  # noqa: E402
from flux_core.mlx.common import to_numpy  # noqa: E402
from flux_core.torch import lora as TL  # noqa: E402


def _mlx_setup(family, tmp_path_factory):
    s = _build(family, tmp_path_factory.mktemp(f"mlx_lora_{family}"))
    s["mlx"] = models.load_transformer(s["path"], backend="mlx", device="cpu", dtype="float32")
    return s


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    return _mlx_setup("klein", tmp_path_factory)


@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    return _mlx_setup("zimage", tmp_path_factory)


def _mlx_weights(model) -> dict:
    from mlx.utils import tree_flatten

    return {k: to_numpy(v) for k, v in tree_flatten(model.parameters())}


def _compare(setup, combo):
    TL.apply_loras(setup["model"].module, [(setup["files"][n], s) for n, s in combo])
    ML.apply_loras(setup["mlx"].module, [(setup["files"][n], s) for n, s in combo])
    want = expected_weights(setup["base"], [(setup["fixtures"][n], s) for n, s in combo])
    got_mlx = _mlx_weights(setup["mlx"].module)
    got_torch = {k: v.detach().numpy() for k, v in setup["model"].module.state_dict().items()}
    worst_truth = worst_torch = 0.0
    for k in want:
        ref = max(np.abs(want[k]).max(), 1e-12)
        worst_truth = max(worst_truth, float(np.abs(got_mlx[k] - want[k]).max() / ref))
        worst_torch = max(worst_torch, float(np.abs(got_mlx[k] - got_torch[k]).max() / ref))
    return worst_truth, worst_torch


@pytest.mark.parametrize("fmt", KLEIN_FORMATS)
def test_klein_mlx_equals_torch(klein, fmt):
    truth, vs_torch = _compare(klein, [(fmt, 0.8)])
    assert truth <= 1e-6 and vs_torch <= 1e-6, f"{fmt}: truth {truth:.2e}, torch {vs_torch:.2e}"


@pytest.mark.parametrize("fmt", ZIMAGE_FORMATS)
def test_zimage_mlx_equals_torch(zimage, fmt):
    truth, vs_torch = _compare(zimage, [(fmt, 0.8)])
    assert truth <= 1e-6 and vs_torch <= 1e-6, f"{fmt}: truth {truth:.2e}, torch {vs_torch:.2e}"


def test_mlx_several_loras_and_restore(klein):
    combo = [("comfy", 0.5), ("diffusers", 1.2), ("dora_peft", 1.0), ("lokr_factor", -0.3)]
    truth, vs_torch = _compare(klein, combo)
    assert truth <= 1e-6 and vs_torch <= 1e-6
    ML.apply_loras(klein["mlx"].module, [])
    got = _mlx_weights(klein["mlx"].module)
    for k, v in klein["base"].items():
        assert np.array_equal(got[k], v.numpy()), k
    assert ML.backup_bytes(klein["mlx"].module) == 0


# ------------------------------------------------------------------------------------------------ quantized

def _quant_case(backend, mode, setup):
    m = models.load_transformer(setup["path"], backend=backend, device="cpu", dtype="float32", quantization=mode)
    return m.module


@pytest.mark.parametrize("backend,mode", [("torch", "int8"), ("torch", "int4"), ("torch", "fp8"),
                                          ("mlx", "int8"), ("mlx", "int4"), ("mlx", "fp8")])
def test_quantized_merge_requantizes_from_the_original(zimage, backend, mode):
    """A quantized layer: W' = Q(deq(Q(W)) + s·ΔW), one quantization of the merged float weight, so its error
    against the float merge is at most two rounding errors (the original's and the merge's: ≤ 2x the max error of
    quantizing the float merge directly, plus the scale change); the non-quantized layers merge exactly; removing the LoRA restores the packed weights bit for bit."""
    mod = _quant_case(backend, mode, zimage)
    applier = TL if backend == "torch" else ML
    fmt = "ai_toolkit"
    fx, path = zimage["fixtures"][fmt], zimage["files"][fmt]
    before = _packed(backend, mod)
    applier.apply_loras(mod, [(path, 1.0)])
    want = expected_weights(zimage["base"], [(fx, 1.0)])
    got = _dequantized(backend, mod)
    for key, w in want.items():
        if key not in got:
            continue
        err = np.abs(got[key] - w).max() / np.abs(w).max()
        bound = _direct_error(backend, mode, w)
        assert err <= 2.1 * bound + 1e-7, f"{key}: {err:.3e} vs direct quantization {bound:.3e}"
    applier.apply_loras(mod, [])
    after = _packed(backend, mod)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


def _packed(backend, mod) -> dict:
    if backend == "torch":
        return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
                for k, v in mod.state_dict().items()}
    from mlx.utils import tree_flatten

    return {k: np.array(v.astype(mx.float32)) if v.dtype != mx.uint32 else np.array(v)
            for k, v in tree_flatten(mod.parameters())}


def _dequantized(backend, mod) -> dict:
    out = {}
    if backend == "torch":
        from flux_core.torch.quant import QuantLinear

        for name, m in mod.named_modules():
            if isinstance(m, QuantLinear):
                out[f"{name}.weight"] = m.dequantize(torch.float32).double().numpy()
        return out
    import mlx.nn as nn

    for name, m in mod.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            w = mx.dequantize(m.weight, m.scales, m.get("biases"), group_size=m.group_size, bits=m.bits,
                              mode=getattr(m, "mode", "affine"))
            out[f"{name}.weight"] = np.array(w.astype(mx.float32)).astype(np.float64)
    return out


def _direct_error(backend, mode, w: np.ndarray) -> float:
    """Relative error of quantizing the float-merged weight directly (the best a merge can do)."""
    if backend == "torch":
        from flux_core.torch.quant import DEQUANTIZERS, QUANTIZERS

        t = torch.from_numpy(w).float()
        d = DEQUANTIZERS[mode](*QUANTIZERS[mode](t), t.shape[1]).double().numpy()
    else:
        from flux_core.mlx.quant import SETTINGS

        s = SETTINGS[mode]
        q = mx.quantize(mx.array(w.astype(np.float32)), **s)
        d = np.array(mx.dequantize(*q, **s).astype(mx.float32)).astype(np.float64)
    return float(np.abs(d - w).max() / np.abs(w).max())


def test_mlx_handles_activate_their_loras(klein):
    """The models API on MLX: a LoRA'd handle and the base share one module; sampling a handle activates it."""
    kw = dict(backend="mlx", device="cpu", dtype="float32")
    base = models.load_transformer(klein["path"], **kw)
    lora = models.load_transformer(klein["path"], loras=[(klein["files"]["loha"], 0.6)], **kw)
    assert lora.module is base.module
    models.load_transformer(klein["path"], **kw)          # the base handle takes the LoRA out again ...
    got = _mlx_weights(base.module)
    assert all(np.array_equal(got[k], v.numpy()) for k, v in klein["base"].items())
    lora.activate()                                       # ... and using the LoRA handle puts it back
    want = expected_weights(klein["base"], [(klein["fixtures"]["loha"], 0.6)])
    got = _mlx_weights(base.module)
    assert max(float(np.abs(got[k] - want[k]).max() / np.abs(want[k]).max()) for k in want) <= 1e-6
    models.load_transformer(klein["path"], **kw)
