"""MLX affine-quantized folders (mflux saves, MLX-community style) on both backends (flux_core/weights/mlx_affine.py).

Folders are written the way mflux's ModelSaver writes them: every Linear through mx.quantize (what
nn.QuantizedLinear.from_linear calls), mflux's parameter names, 0.safetensors... shards, an index, the
`quantization_level` metadata. torch must load exactly mx.dequantize of the stored weights; MLX must keep them as
nn.QuantizedLinear with the stored words, scales and biases, and give the same image as the dequantized weights.
"""
import numpy as np
import pytest
import torch

import prequant_fixtures as PF
from flux_core import demo
from flux_core.errors import WeightError
from flux_core.weights import prequant
from flux_core.weights import klein as klein_keys, zimage as zimage_keys
from flux_core.weights.io import save_safetensors

mx = pytest.importorskip("mlx.core")
import mlx.nn as mnn  # noqa: E402

from test_gguf import image, load_t, load_te  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlxq")
    paths = demo.write_demo_checkpoints(root / "demo")
    states = {k: PF.random_state(k, seed=10 + i) for i, k in enumerate(("klein", "zimage", "qwen3"))}
    plain = {"qwen3": root / "qwen3.safetensors", "klein": root / "klein.safetensors"}
    save_safetensors({"model." + k: v for k, v in states["qwen3"].items()}, plain["qwen3"])
    save_safetensors(states["klein"], plain["klein"], {"fluxcore.distilled": "true"})
    return {"root": root, "paths": paths, "states": states, "plain": plain, "made": {}}


def folder(world, kind: str, bits: int, group: int = 64, style: str = "mflux"):
    """(folder written like mflux / MLX-community, the reference safetensors of mx.dequantize's weights)."""
    key = (kind, bits, group, style)
    if key in world["made"]:
        return world["made"][key]
    sd = world["states"][kind]
    if kind == "klein":
        foreign = klein_keys.DIFFUSERS.from_native(sd)
    elif kind == "zimage":
        foreign = zimage_keys.to_diffusers(sd)
    else:
        foreign = dict(sd)  # mflux's Qwen3 parameter paths are HF names without `model.`
    names = {k: next(iter(PF.to_mflux_names({k: None}))) for k in foreign}
    out = world["root"] / f"{kind}-{bits}-{group}-{style}" / ("text_encoder" if kind == "qwen3" else "transformer")
    if style == "mflux":
        ref = PF.write_mlx_folder({names[k]: v for k, v in foreign.items()}, out, bits, group)
    else:  # MLX-community style: settings in config.json, no shard metadata, diffusers names
        ref = PF.write_mlx_folder(foreign, out, bits, group, metadata=False,
                                  config={"quantization": {"group_size": group, "bits": bits}})
        names = {k: k for k in foreign}
    ref_path = out.parent / "reference.safetensors"
    back = {k: ref[names[k]] for k in foreign}
    save_safetensors({"model." + k: v for k, v in back.items()} if kind == "qwen3" else back, ref_path,
                     {"fluxcore.distilled": "true"} if kind == "klein" else None)
    world["made"][key] = (out, ref_path)
    return out, ref_path


def _torch_state(path, kind):
    if kind == "qwen3":
        return load_te(path, demo.write_byte_tokenizer(path.parent / "tok")).module.model.state_dict()
    return load_t(path).module.state_dict()


@pytest.mark.parametrize("kind,bits,group,style", [("klein", 4, 64, "mflux"), ("zimage", 8, 64, "mflux"),
                                                   pytest.param("qwen3", 4, 64, "mflux", marks=pytest.mark.slow),
                                                   ("klein", 8, 32, "community"),
                                                   pytest.param("zimage", 3, 64, "mflux", marks=pytest.mark.slow),
                                                   pytest.param("klein", 6, 128, "community", marks=pytest.mark.slow)])
def test_torch_loads_exactly_mx_dequantize(world, kind, bits, group, style):
    path, ref = folder(world, kind, bits, group, style)
    assert prequant.detect(path.parent, "text_encoder" if kind == "qwen3" else "transformer") == "mlx"
    got, want = _torch_state(path, kind), _torch_state(ref, kind)
    assert got.keys() == want.keys()
    for k in got:
        assert torch.equal(got[k], want[k]), k
    q, meta, _, _ = prequant.read(path)
    assert meta["mlx.bits"] == str(bits) and meta["mlx.group_size"] == str(group)


@pytest.mark.slow  # MLX CPU encodes the prompt slowly (28 layers x 512 tokens)
@pytest.mark.parametrize("kind,bits", [("klein", 4), ("zimage", 8)])
def test_mlx_keeps_the_stored_codes_and_matches_the_image(world, kind, bits):
    path, ref = folder(world, kind, bits)
    mx.disable_compile()
    try:
        t = load_t(path, "mlx")
        te = load_te(world["plain"]["qwen3"], world["paths"]["tokenizer"], "mlx")
        got, want = image(world, t, te, kind, "mlx"), image(world, load_t(ref, "mlx"), te, kind, "mlx")
    finally:
        mx.enable_compile()
    assert float(np.abs(got - want).max()) <= 1 / 255 and got.std() > 0.01
    layers = [(n, m) for n, m in t.module.named_modules() if isinstance(m, mnn.QuantizedLinear)]
    assert layers and all(m.bits == bits and m.group_size == 64 for _, m in layers)
    # the words are the file's own: spot-check one fused layer against mx.quantize of the reference weights' parts
    name = "double_blocks.0.img_mlp.0" if kind == "klein" else "layers.0.feed_forward.w1"
    m = dict(layers)[name]
    w = mx.dequantize(m.weight, m.scales, m.biases, group_size=64, bits=bits)
    src = _torch_state(ref, kind)[name + ".weight"].numpy()
    np.testing.assert_array_equal(np.array(w), src)


@pytest.mark.slow
def test_mlx_qwen3_folder_with_quantized_embedding(world):
    path, ref = folder(world, "qwen3", 4)
    tok = world["paths"]["tokenizer"]
    mx.disable_compile()
    try:
        t = load_t(world["plain"]["klein"], "mlx")
        got = image(world, t, load_te(path, tok, "mlx"), "klein", "mlx")
        want = image(world, t, load_te(ref, tok, "mlx"), "klein", "mlx")
    finally:
        mx.enable_compile()
    assert float(np.abs(got - want).max()) <= 1 / 255


def test_inconsistent_bits_are_refused(world, tmp_path):
    path, _ = folder(world, "klein", 4)
    import json
    import shutil

    bad = tmp_path / "transformer"
    shutil.copytree(path, bad)
    (bad / "config.json").write_text(json.dumps({"quantization": {"bits": 8, "group_size": 64}}))
    with pytest.raises(WeightError, match="does not fit 8-bit weights in groups of 64"):
        prequant.read(bad)
