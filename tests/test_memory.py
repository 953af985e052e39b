"""Load-size estimate from checkpoint headers (flux_core/memory.py) and the refusal message, with faked free memory.

The estimate is checked against the bytes the loaded (and quantized, and offloaded) torch modules really hold, on the
tiny demo checkpoints, and against the real klein-4B size (7.75 GB of bf16 weights, the H200 measurement in the
issue) from the real geometry's shapes.
"""
import pytest
import torch

from flux_core import memory
from flux_core.configs import KleinConfig
from flux_core.demo import write_demo_checkpoints
from flux_core.errors import ConfigError
from flux_core.torch import offload as O
from flux_core.torch.klein import Flux2Transformer, load_klein
from flux_core.torch.quant import module_bytes, quantize_model


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_checkpoints(tmp_path_factory.mktemp("demo"))


def _klein_path(demo):
    return next(p for k, p in demo.items() if k == "klein")


def test_header_only_estimate_equals_loaded_bytes(demo):
    path = _klein_path(demo)
    specs = memory.checkpoint_specs(path, "transformer")
    for q in ("none", "int8", "int4"):
        model = load_klein(path)
        quantize_model(model, q)
        assert memory.weight_bytes(specs, "float32", q) == module_bytes(model), q
    # blocks: base + two slots of the largest block (the Offloader's own accounting; its 256-byte alignment aside)
    model = load_klein(path)
    off = O.offload(model, "cpu", "blocks", copy=True)
    est = memory.weight_bytes(specs, "float32", "none", "blocks")
    assert abs(est - off.device_bytes("blocks")) <= 256 * (len(off.base.entries) + 2 * len(off.blocks[0].entries))


def _real_klein_specs():
    with torch.device("meta"):
        m = Flux2Transformer(KleinConfig())
    return {k: memory.TensorSpec("BF16", tuple(v.shape)) for k, v in m.state_dict().items()}


def test_real_klein_sizes():
    specs = _real_klein_specs()
    assert memory.weight_bytes(specs, "bfloat16") / 1e9 == pytest.approx(7.75, abs=0.01)
    blocks = memory.weight_bytes(specs, "bfloat16", offload="blocks") / 1e9
    assert 1.0 < blocks < 1.5   # base (~0.3 GB: embedders, shared modulations) + 2 double blocks (~0.5 GB each)
    assert memory.weight_bytes(specs, "bfloat16", "int8") < 0.55 * memory.weight_bytes(specs, "bfloat16")


def test_refusal_names_what_fits(demo, monkeypatch):
    specs = _real_klein_specs()
    monkeypatch.setattr(memory, "checkpoint_specs", lambda path, component=None: specs)
    need = memory.need_bytes(specs, "transformer", "bfloat16") / 1e9
    with pytest.raises(ConfigError) as e:
        memory.check_fits("flux-2-klein-4b.safetensors", "transformer", "bfloat16", free_bytes=lambda: int(6.1e9))
    msg = str(e.value)
    assert msg.startswith(f"flux-2-klein-4b.safetensors needs {need:.1f} GB, 6.1 GB free: use quantization int8 or "
                          "quantization int4 or offload blocks"), msg
    with pytest.raises(ConfigError, match="2.6 GB free: use offload blocks or quantization int8 with offload blocks"):
        memory.check_fits("k.safetensors", "transformer", "bfloat16", free_bytes=lambda: int(2.6e9))  # streaming
    with pytest.raises(ConfigError, match="no quantization / offload combination fits"):
        memory.check_fits("k.safetensors", "transformer", "bfloat16", free_bytes=lambda: int(0.5e9))
    # fits: the estimate comes back; unknown free memory (CPU, MLX): no check at all
    assert memory.check_fits("k.safetensors", "transformer", "bfloat16", free_bytes=lambda: int(20e9)) > 7.75e9
    assert memory.check_fits("k.safetensors", "transformer", "bfloat16", free_bytes=lambda: None) is None
    assert memory.check_fits("k.safetensors", "transformer", "bfloat16", "none", "blocks",
                             free_bytes=lambda: int(3e9)) < 3e9


def test_unknown_formats_are_not_estimated(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    assert memory.checkpoint_specs(tmp_path / "x.gguf") is None
    assert memory.check_fits(tmp_path / "x.gguf", "transformer", "bfloat16", free_bytes=lambda: 1) is None


def test_resolve_offload():
    specs = _real_klein_specs()
    free = lambda: int(6e9)  # noqa: E731
    assert memory.resolve_offload("auto", "torch", "cuda", specs, free_bytes=free)[0] == "blocks"
    assert memory.resolve_offload("auto", "torch", "cuda", specs, free_bytes=lambda: int(20e9))[0] == "none"
    vae_like = {"decoder.conv_in.weight": memory.TensorSpec("F32", (512, 32, 3, 3000))}
    assert memory.resolve_offload("auto", "torch", "cuda", vae_like, "vae", free_bytes=lambda: int(1e9))[0] == "model"
    assert memory.resolve_offload("blocks", "torch", "cuda:1")[0] == "blocks"
    assert memory.resolve_offload("auto", "torch", "cuda", specs, free_bytes=lambda: None)[0] == "none"
    mode, why = memory.resolve_offload("auto", "mlx", "gpu")
    assert mode == "none" and "unified memory" in why
    for backend, device in (("mlx", "gpu"), ("torch", "cpu"), ("torch", "mps")):
        with pytest.raises(ConfigError, match="nothing to move: use offload none"):
            memory.resolve_offload("blocks", backend, device)
    with pytest.raises(ConfigError, match="none, model, blocks"):
        memory.resolve_offload("layers", "torch", "cuda")


def test_estimate_of_a_saved_quantized_file_equals_loaded_bytes(demo, tmp_path):
    """A FluxCore quantized file is charged its stored codes and scales, as the loader keeps them."""
    from flux_core.torch import qload

    for q in ("int8", "int4", "fp8"):
        out = qload.quantize_file(_klein_path(demo), tmp_path / f"k-{q}.safetensors", q)["output"]
        specs = memory.checkpoint_specs(out, "transformer")
        model, _ = qload.load_file(out)
        assert memory.weight_bytes(specs, "float32") == module_bytes(model), q
