"""Saved quantized files (flux_core/weights/qfile.py, torch/qload.py, mlx/qload.py).

Against load-time quantization of the same tiny demo checkpoints: every stored tensor bit-identical on torch, every
MLX parameter bit-identical on MLX (and the MLX codes equal the torch codes); the metadata states the format; the
host memory of a load stays within 1.2x the file (measured in a fresh process); bad files are refused by name.
"""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from flux_core import demo, models
from flux_core.errors import WeightError
from flux_core.torch import qload as TQL, quant as TQ
from flux_core.weights import qfile
from flux_core.weights.io import save_safetensors

try:
    import mlx.core as mx
    import mlx.nn as mnn
    from mlx.utils import tree_flatten
    from flux_core.mlx import qload as MQL, quant as MQ
    from flux_core.mlx.qwen3 import load_qwen3 as mlx_qwen3
except ImportError:
    mx = None

MODES = ("int8", "int4", "fp8")
ROLES = {"klein": "transformer", "zimage": "transformer", "text_encoder": "text_encoder"}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return demo.write_demo_checkpoints(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def files(paths, tmp_path_factory):
    out = tmp_path_factory.mktemp("q")
    return {(role, mode): TQL.quantize_file(paths[role], out / f"{role}-{mode}.safetensors", mode, comp)["output"]
            for role, comp in ROLES.items() for mode in MODES}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _torch_load_time(paths, role, mode):
    if role == "text_encoder":
        from flux_core.torch.qwen3 import load_qwen3

        m = load_qwen3(str(paths[role]))
        TQ.quantize_model(m, mode)
        return m
    return models.load_transformer(paths[role], backend="torch", dtype="float32", quantization=mode).module


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("role", list(ROLES))
def test_torch_file_equals_load_time_quantization(paths, files, role, mode):
    got, meta = TQL.load_file(files[role, mode])
    want = _torch_load_time(paths, role, mode)
    a, b = got.state_dict(), want.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(_bits(a[k]), _bits(b[k])), k
    n_q = sum(isinstance(m, TQ.QuantLinear) for m in got.modules())
    assert n_q == len(json.loads(meta["fluxcore.quantized"])) > 0


def test_metadata_states_the_format(files):
    meta = qfile.SafetensorsStream(files["klein", "int4"]).metadata
    assert meta["fluxcore.format"] == "fluxcore-quantized" and meta["fluxcore.format_version"] == "1"
    assert (meta["fluxcore.quantization"], meta["fluxcore.group_size"]) == ("int4", "64")
    assert (meta["fluxcore.component"], meta["fluxcore.family"]) == ("transformer", "klein")
    assert meta["fluxcore.distilled"] == "true" and meta["fluxcore.source_dtype"] == "float32"
    layers = json.loads(meta["fluxcore.quantized"])
    assert "double_blocks.0.img_attn.qkv" in layers and "single_stream_modulation.lin" in layers  # int4: modulation too
    int8 = json.loads(qfile.SafetensorsStream(files["klein", "int8"]).metadata["fluxcore.quantized"])
    assert not any("modulation" in n for n in int8) and not any(n.startswith("final_layer") for n in layers)
    assert qfile.is_quantized_file(files["klein", "int4"]) and not qfile.is_quantized_file(__file__)
    stream = qfile.SafetensorsStream(files["klein", "int4"])
    assert stream.dtype("double_blocks.0.img_attn.qkv.weight_scale") == "F16"  # int4 scales are fp16
    assert stream.dtype("double_blocks.0.img_attn.qkv.weight") == "U8"


def test_int4_file_smaller_than_int8(files):
    import os

    sizes = {m: os.path.getsize(files["klein", m]) for m in MODES}
    assert sizes["int4"] < sizes["int8"] == pytest.approx(sizes["fp8"], rel=0.01)


@pytest.mark.skipif(mx is None, reason="mlx is not installed")
@pytest.mark.parametrize("mode", ("int8", "int4"))
@pytest.mark.parametrize("role", list(ROLES))
def test_mlx_file_equals_mlx_load_time_quantization(paths, files, role, mode):
    got, _ = MQL.load_file(files[role, mode])
    if role == "text_encoder":
        want = mlx_qwen3(str(paths[role]))
        MQ.quantize_model(want, mode)
    else:
        want = models.load_transformer(paths[role], backend="mlx", dtype="float32", quantization=mode).module
    a, b = dict(tree_flatten(got.parameters())), dict(tree_flatten(want.parameters()))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]).item(), k
    # ... and the MLX codes are the torch codes: unpack one layer's words and compare with the torch buffers
    tmod, _ = TQL.load_file(files[role, mode])
    name = {"klein": "double_blocks.0.img_mlp.0", "zimage": "layers.0.attention.qkv",
            "text_encoder": "layers.0.mlp.down_proj"}[role]
    tl, ml = tmod.get_submodule(name), _mlx_sub(got, name)
    assert isinstance(ml, mnn.QuantizedLinear) and ml.group_size == 64
    codes = np.array(ml.weight).view(np.uint8)
    want_codes = tl.weight.numpy().view(np.uint8) ^ (0x80 if mode == "int8" else 0)  # +128 on int8 bytes
    np.testing.assert_array_equal(codes, want_codes)
    scales = np.array(ml.scales)
    ref = tl.weight_scale.float().numpy()
    np.testing.assert_array_equal(scales, np.broadcast_to(ref, scales.shape))
    np.testing.assert_array_equal(np.array(ml.biases), -scales * (128 if mode == "int8" else 8))


@pytest.mark.skipif(mx is None, reason="mlx is not installed")
def test_mlx_fp8_file_keeps_our_bytes(files):
    got, _ = MQL.load_file(files["klein", "fp8"])
    tmod, _ = TQL.load_file(files["klein", "fp8"])
    name = "single_blocks.1.linear1"
    ml, tl = _mlx_sub(got, name), tmod.get_submodule(name)
    assert isinstance(ml, MQ.DequantLinear)
    np.testing.assert_array_equal(np.array(ml.weight), tl.weight.view(torch.uint8).numpy())
    w = np.array(MQ.dequantize_weight("fp8", ml.weight, ml.weight_scale, ml.in_features))
    np.testing.assert_array_equal(w, tl.dequantize(torch.float32).numpy())  # from_fp8 == torch's float8 decode


def _mlx_sub(model, name):
    m = model
    for p in name.split("."):
        m = m[int(p)] if isinstance(m, list) else getattr(m, p)
    return m


def test_damaged_files_are_refused(files, tmp_path):
    src = qfile.SafetensorsStream(files["klein", "int8"])
    sd = {k: src.read(k) for k in src.keys() if k != "double_blocks.0.img_attn.qkv.weight_scale"}
    bad = tmp_path / "bad.safetensors"
    save_safetensors(sd, bad, src.metadata)
    with pytest.raises(WeightError, match="double_blocks.0.img_attn.qkv has no"):
        TQL.load_file(bad)
    newer = dict(src.metadata, **{"fluxcore.format_version": "9"})
    save_safetensors({k: src.read(k) for k in src.keys()}, bad, newer)
    with pytest.raises(WeightError, match="version 9; this flux_core reads up to 1"):
        TQL.load_file(bad)
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(open(files["klein", "int8"], "rb").read()[:-1000])
    with pytest.raises(WeightError, match="truncated"):
        TQL.load_file(trunc)


def test_already_quantized_source_is_refused(files, tmp_path):
    with pytest.raises(Exception, match="quantize"):
        TQL.quantize_file(files["klein", "int8"], tmp_path / "x.safetensors", "int4")


# ------------------------------------------------------------------------------------------------ host memory

_MEASURE = textwrap.dedent("""
    import json, os, sys, torch
    from flux_core.torch import klein, qload, qwen3, zimage  # every import before the baseline
    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    torch.ones(1) @ torch.ones(1)           # torch's lazy init before the baseline
    base = rss("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")   # reset VmHWM to the current RSS
    model, _ = qload.load_file(sys.argv[1])
    print(json.dumps({"base": base, "peak": rss("VmHWM"), "size": os.path.getsize(sys.argv[1])}))
""")


@pytest.mark.slow
def test_loading_a_quantized_file_peaks_near_its_size(tmp_path):
    """A ~90 MB int8 klein-shaped file (hidden 768) loads with the process's peak RSS <= 1.2x the file size above
    the baseline (the model itself is the file's size; reading the file whole first would double it)."""
    from flux_core.torch.klein import Flux2Transformer, KleinConfig

    cfg = KleinConfig(in_channels=16, out_channels=16, hidden_size=768, num_heads=6, head_dim=128, depth=2,
                      depth_single=4, context_in_dim=256, axes_dim=(32, 32, 32, 32))
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in Flux2Transformer(cfg).state_dict().items()}
    save_safetensors(sd, tmp_path / "src.safetensors")
    del sd
    out = tmp_path / "int8.safetensors"
    TQL.quantize_file(tmp_path / "src.safetensors", out, "int8")
    res = subprocess.run([sys.executable, "-c", _MEASURE, str(out)], capture_output=True, text=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(demo.Path(__file__).parents[1])})
    assert res.returncode == 0, res.stderr
    m = json.loads(res.stdout.strip().splitlines()[-1])
    ratio = (m["peak"] - m["base"]) / m["size"]
    print(f"file {m['size'] / 1e6:.1f} MB, host peak above baseline {(m['peak'] - m['base']) / 1e6:.1f} MB "
          f"= {ratio:.3f}x")
    assert m["size"] > 50e6 and ratio <= 1.2, m


# ------------------------------------------------------------------------------------------------ CLI and loaders

def test_cli_quantize_then_the_loaders_just_accept_the_files(paths, tmp_path):
    """`python -m flux_core quantize` for a transformer and a text encoder; models.load_* take the outputs as they
    take any checkpoint, on both backends, and a generation runs from them."""
    from flux_core import pipeline
    from flux_core.__main__ import main

    t_out, te_out = tmp_path / "klein-int4.safetensors", tmp_path / "qwen-int8.safetensors"
    assert main(["quantize", "--model", str(paths["klein"]), "--quantization", "int4", "--output", str(t_out)]) == 0
    assert main(["quantize", "--text-encoder", str(paths["text_encoder"]), "--quantization", "int8",
                 "--output", str(te_out)]) == 0
    for be in ("torch", "mlx") if mx is not None else ("torch",):
        t = models.load_transformer(t_out, backend=be, dtype="float32")
        te = models.load_text_encoder(te_out, str(paths["tokenizer"]), backend=be, dtype="float32")
        vae = models.load_vae(paths["flux2_vae"], backend=be, dtype="float32")
        assert (t.quantization, te.quantization, t.family.name) == ("int4", "int8", "klein")
        assert any("FluxCore int4 file" in n for n in t.notes)
        if mx is not None:
            mx.disable_compile()
        try:
            g = pipeline.generate(t, te, vae, "a cat", width=64, height=64, steps=2, seed=1,
                                  release_text_encoder=False)
        finally:
            if mx is not None:
                mx.enable_compile()
        assert np.isfinite(np.asarray(g.images)).all()
    with pytest.raises(Exception, match="already quantized.*quantization 'none'"):
        models.load_transformer(t_out, backend="torch", dtype="float32", quantization="int8")


def test_cli_quantize_refuses_bad_output(paths, tmp_path):
    from flux_core.__main__ import main

    assert main(["quantize", "--model", str(paths["klein"]), "--quantization", "int8", "--output",
                 str(tmp_path / "x.bin")]) == 2
