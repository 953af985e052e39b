"""GGUF files as ComfyUI-GGUF users have them (flux_core/weights/gguf.py, torch/gguf.py, mlx/qload.py).

Files are written with the `gguf` package's own writer and quantizer in ComfyUI-GGUF's layout (arch "flux" /
"lumina2" with the original tensor names, llama.cpp names for the Qwen3 encoder, small and 1-D tensors in F32);
K-quants, which gguf-py can only dequantize, get valid random blocks. The reference is the same weights decoded by
`gguf.quants.dequantize`, saved as ordinary safetensors and loaded by the ordinary loaders: the GGUF file must give
the same image (<= 1/255), and our torch dequantizers must equal gguf's bit for bit in float32.
"""
import numpy as np
import pytest
import torch

import prequant_fixtures as PF
from flux_core import demo, models, pipeline
from flux_core.errors import ConfigError, WeightError
from flux_core.families import detect_family
from flux_core.torch import gguf as TG
from flux_core.weights import prequant
from flux_core.weights.io import save_safetensors

try:
    import mlx.core as mx
    import mlx.nn as mnn
    HAS_MLX = True
except ImportError:
    HAS_MLX = False

ALL_TYPES = tuple(t for t in TG.TYPES)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    paths = demo.write_demo_checkpoints(root / "demo")
    states = {k: PF.random_state(k, seed=i) for i, k in enumerate(("klein", "zimage", "qwen3"))}
    refs = {"klein": root / "klein.safetensors", "zimage": root / "zimage.safetensors",
            "qwen3": root / "qwen3.safetensors"}
    save_safetensors(states["klein"], refs["klein"], {"fluxcore.distilled": "true"})
    save_safetensors(states["zimage"], refs["zimage"])
    save_safetensors({"model." + k: v for k, v in states["qwen3"].items()}, refs["qwen3"])
    return {"root": root, "paths": paths, "states": states, "plain": refs, "files": {}}


def gguf_pair(world, kind: str, qtype: str):
    """(the .gguf file, the safetensors file of gguf's dequantization of it), written once per (kind, type)."""
    key = (kind, qtype)
    if key not in world["files"]:
        root, sd = world["root"], world["states"][kind]
        path, ref_path = root / f"{kind}-{qtype}.gguf", root / f"{kind}-{qtype}-ref.safetensors"
        if kind == "qwen3":
            ref = PF.write_gguf(sd, path, "qwen3", qtype, kv=PF.qwen3_kv(), rename=PF.hf_to_llama)
            save_safetensors({"model." + k: v for k, v in ref.items()}, ref_path)
        else:
            ref = PF.write_gguf(sd, path, {"klein": "flux", "zimage": "lumina2"}[kind], qtype)
            save_safetensors(ref, ref_path, {"fluxcore.distilled": "true"} if kind == "klein" else None)
        world["files"][key] = (path, ref_path)
    return world["files"][key]


def load_t(path, backend="torch"):
    """A transformer, plain or pre-quantized: the loaders just accept the file."""
    return models.load_transformer(path, backend=backend, dtype="float32")


def load_te(path, tok, backend="torch"):
    return models.load_text_encoder(path, str(tok), backend=backend, dtype="float32")


def image(world, t, te, fam, backend="torch"):
    vae = models.load_vae(world["paths"]["flux2_vae" if fam == "klein" else "flux1_vae"], backend=backend,
                          dtype="float32")
    g = pipeline.generate(t, te, vae, "a red cat on a mat", width=64, height=64, steps=2, seed=7,
                          release_text_encoder=False)
    return np.asarray(g.images, dtype=np.float32)


# ------------------------------------------------------------------------------------------------ dequantization

@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_torch_dequant_equals_gguf_bit_for_bit(qtype):
    import gguf

    rng = np.random.default_rng(1)
    a = (rng.standard_normal((6, 512)) * 0.05).astype(np.float32)
    T = gguf.GGMLQuantizationType[qtype]
    raw = PF.random_k_blocks(a.shape, qtype, rng) if qtype in PF.K_SCALE else gguf.quants.quantize(a, T)
    want = np.asarray(gguf.quants.dequantize(raw, T), dtype=np.float32)
    got = TG.dequantize(torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).copy()), qtype, want.shape)
    np.testing.assert_array_equal(got.numpy().view(np.uint32), want.view(np.uint32))


def test_unsupported_type_is_named():
    with pytest.raises(WeightError, match="IQ2_XXS is not supported"):
        TG.dequantize(torch.zeros(66, dtype=torch.uint8), "IQ2_XXS", (256,))


# ------------------------------------------------------------------------------------------------ whole images

# every (model, type) pair; one in the fast tier (a Qwen3 pass over 512 tokens x 28 layers costs seconds), which
# also has the exact forward check below
FAST = {("zimage", "Q5_K")}
CASES = [pytest.param(k, t, marks=() if (k, t) in FAST else pytest.mark.slow)
         for k in ("klein", "zimage", "qwen3") for t in PF.GGUF_TYPES]


@pytest.mark.parametrize("kind,qtype", CASES)
def test_gguf_image_equals_gguf_dequantized_weights(world, kind, qtype):
    path, ref_path = gguf_pair(world, kind, qtype)
    tok = world["paths"]["tokenizer"]
    if kind == "qwen3":
        t = load_t(world["plain"]["klein"])
        got = image(world, t, load_te(path, tok), "klein")
        want = image(world, t, load_te(ref_path, tok), "klein")
        mod = load_te(path, tok).module.model
    else:
        te = load_te(world["plain"]["qwen3"], tok)
        got_t = load_t(path)
        got = image(world, got_t, te, kind)
        want = image(world, load_t(ref_path), te, kind)
        mod = got_t.module
    diff = float(np.abs(got - want).max())
    print(f"{kind} {qtype}: max image difference {diff * 255:.4f} / 255")
    assert diff <= 1 / 255 and got.std() > 0.01
    kept = [m for m in mod.modules() if isinstance(m, TG.GGUFLinear)]
    if qtype in ("F16", "BF16", "F32"):
        assert not kept
    else:  # quantized Linears stay in their blocks on the device
        assert kept and all(m.weight.dtype == torch.uint8 and m.qtype == qtype for m in kept)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q8_0", "Q5_0", "BF16"])
def test_gguf_klein_forward_equals_the_dequantized_weights_exactly(world, qtype):
    """The GGUF transformer (weights kept in blocks, dequantized in each forward) vs the same weights dequantized by
    gguf-py and loaded as plain float32 Linears: every matmul gets bit for bit the same weight, and the outputs agree
    to float32 round-off. (Not bit for bit: MKL's M=1 products, here time_in, round differently with the operands'
    addresses mod 16 bytes, which differ between two model instances; docs/NOTES.md.)"""
    from flux_core.torch.klein import position_ids, text_ids

    path, ref_path = gguf_pair(world, "klein", qtype)
    got, want = load_t(path).module, load_t(ref_path).module
    ref, checked = want.state_dict(), 0
    for name, m in got.named_modules():
        w = m.dequantize() if isinstance(m, TG.GGUFLinear) else getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and f"{name}.weight" in ref:
            assert torch.equal(w.float(), ref[f"{name}.weight"]), name
            checked += 1
    assert checked >= len([k for k in ref if k.endswith(".weight") and "blocks" in k])
    g = torch.Generator().manual_seed(2)
    img, txt = torch.randn(1, 12, PF.KLEIN["in_channels"], generator=g), torch.randn(1, 5, 768, generator=g)
    args = (img, position_ids(3, 4)[None], txt, text_ids(5)[None], torch.tensor([0.7]))
    with torch.inference_mode():
        a, b = got(*args), want(*args)
    assert float((a - b).abs().max() / b.abs().max()) < 1e-6


def test_gguf_detection_and_names(world):
    path, _ = gguf_pair(world, "qwen3", "Q8_0")
    qstate, meta, config, _ = prequant.read(path)
    assert meta["gguf.architecture"] == "qwen3" and "Q8_0" in meta["gguf.types"]
    assert "layers.3.self_attn.o_proj.weight" in qstate and "embed_tokens.weight" in qstate
    assert config["num_hidden_layers"] == 28 and config["rope_theta"] == 1e6
    kpath, _ = gguf_pair(world, "klein", "Q4_0")
    assert prequant.detect(kpath) == "gguf" and detect_family(prequant.read(kpath)[0]).name == "klein"
    zpath, _ = gguf_pair(world, "zimage", "Q4_0")
    assert detect_family(prequant.read(zpath)[0]).name == "zimage"
    t = load_t(kpath)
    assert t.quantization == "gguf" and "Q4_0" in " ".join(t.notes) and t.variant.name.startswith("klein")
    with pytest.raises(ConfigError, match="already quantized.*quantization 'none'"):
        models.load_transformer(kpath, backend="torch", dtype="float32", quantization="int8")


def test_foreign_architecture_is_refused(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "sdxl.gguf"), arch="sdxl")
    w.add_tensor("input_blocks.0.0.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(WeightError, match="architecture 'sdxl'"):
        prequant.read(tmp_path / "sdxl.gguf")


# ------------------------------------------------------------------------------------------------ MLX

@pytest.mark.skipif(not HAS_MLX, reason="mlx is not installed")
@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_K", "Q6_K", "BF16"])
@pytest.mark.parametrize("kind", ["klein", "zimage", "qwen3"])
def test_gguf_on_mlx(world, kind, qtype):
    mx.disable_compile()
    try:
        path, ref_path = gguf_pair(world, kind, qtype)
        tok = world["paths"]["tokenizer"]
        if kind == "qwen3":
            t = load_t(world["plain"]["klein"], "mlx")
            te = load_te(path, tok, "mlx")
            got, want = image(world, t, te, "klein", "mlx"), image(world, t, load_te(ref_path, tok, "mlx"), "klein", "mlx")
            mod = te.module.model
        else:
            te = load_te(world["plain"]["qwen3"], tok, "mlx")
            t = load_t(path, "mlx")
            got, want = image(world, t, te, kind, "mlx"), image(world, load_t(ref_path, "mlx"), te, kind, "mlx")
            mod = t.module
    finally:
        mx.enable_compile()
    assert float(np.abs(got - want).max()) <= 1 / 255
    native = [m for _, m in mod.named_modules() if isinstance(m, mnn.QuantizedLinear)]
    if qtype in ("Q8_0", "Q4_0"):  # mapped exactly onto MLX's affine layout, group 32
        assert native and all(m.group_size == 32 and m.bits == (8 if qtype == "Q8_0" else 4) for m in native)
    else:
        assert not native


def test_loader_nodes_list_gguf_files(world, tmp_path):
    """The loader combos offer .gguf files from diffusion_models/ + unet/ and text_encoders/ + clip/, not from vae/;
    the model loader node then loads one like any file."""
    import shutil

    import nodes
    from nodes import host

    root = tmp_path / "models"
    for sub, kind in (("unet", "klein"), ("clip", "qwen3"), ("vae", "klein")):
        (root / sub).mkdir(parents=True)
        shutil.copy(gguf_pair(world, kind, "Q8_0")[0], root / sub / f"{kind}-Q8_0.gguf")
    host.set_model_roots([root])
    try:
        assert "klein-Q8_0.gguf" in host.list_models("diffusion_models")
        assert "qwen3-Q8_0.gguf" in host.list_models("text_encoders")
        assert not host.list_models("vae")
        node = nodes.NODE_CLASS_MAPPINGS["FluxCoreKleinModelLoader"]
        assert "klein-Q8_0.gguf" in node.INPUT_TYPES()["required"]["model_name"][0]
        out = getattr(node(), node.FUNCTION)(model_name="klein-Q8_0.gguf", backend="torch", dtype="float32",
                                             quantization="none", variant="auto")
        assert "gguf" in str(out["ui"]["fluxcore"][0]["details"]).lower()
    finally:
        host.set_model_roots([])


@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0", "Q5_0", "Q6_K"])
def test_gguf_linear_compiles_without_graph_breaks(qtype):
    """The dequantizers trace whole (the type is a Python constant): regional torch.compile keeps blocks fused."""
    import gguf

    rng = np.random.default_rng(3)
    a = rng.standard_normal((64, 256)).astype(np.float32)
    raw = PF.random_k_blocks(a.shape, qtype, rng) if qtype in PF.K_SCALE else \
        gguf.quants.quantize(a, gguf.GGMLQuantizationType[qtype])
    lin = TG.GGUFLinear(qtype, 256, 64, torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).copy()))
    x = torch.randn(3, 256)
    assert torch._dynamo.explain(lin)(x).graph_break_count == 0
    assert torch.equal(torch.compile(lin, fullgraph=True, backend="aot_eager")(x), lin(x))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0"])
def test_gguf_blocks_stream_with_offload(world, qtype):
    """GGUFLinear's raw blocks are uint8 buffers: block streaming (flux_core/torch/offload.py) moves them like any
    weight and the output is bit-identical to the resident model."""
    from flux_core.torch import offload as O
    from flux_core.torch.klein import position_ids, text_ids
    from flux_core.torch.loaders import load_prequantized
    from flux_core.weights.io import load_checkpoint

    path, _ = gguf_pair(world, "klein", qtype)
    resident, streamed = (load_prequantized("klein", load_checkpoint(path, "transformer"), "float32", "cpu")
                          for _ in range(2))
    O.offload(streamed, "cpu", "blocks", copy=True)
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(1, 12, PF.KLEIN["in_channels"], generator=g), torch.randn(1, 5, 768, generator=g)
    args = (img, position_ids(3, 4)[None], txt, text_ids(5)[None], torch.tensor([0.7]))
    with torch.inference_mode():
        want = resident(*args)
        got = [streamed(*args).clone() for _ in range(2)]
    assert all(torch.equal(x, want) for x in got)
