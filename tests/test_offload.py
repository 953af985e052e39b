"""Offload (flux_core/torch/offload.py): streamed blocks and whole-model offload give bit-identical outputs.

On the CPU the copy machinery runs with `copy=True` (host buffer -> slot buffer copies, the same code path as CUDA
with null streams), so a wrong slot, a stale binding or a missed prefetch shows up as a different output. The
reference is the same model, resident and unwrapped. Bit-identical because weights are only copied, never converted.
"""
import pytest
import torch

from flux_core.configs import KleinConfig, Qwen3Config, VAEConfig, ZImageConfig
from flux_core.demo import KLEIN, QWEN, VAE_COMMON, ZIMAGE
from flux_core.errors import ConfigError
from flux_core.torch import offload as O
from flux_core.torch.klein import Flux2Transformer, position_ids, text_ids
from flux_core.torch.qwen3 import Qwen3Encoder
from flux_core.torch.quant import quantize_model
from flux_core.torch.vae import Flux2VAE
from flux_core.torch.zimage import ZImageTransformer


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    return model.eval().requires_grad_(False)


def _klein(depth=2, single=3):
    return _randomize(Flux2Transformer(KleinConfig(**{**KLEIN, "depth": depth, "depth_single": single})))


def _klein_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(1, 12, KLEIN["in_channels"], generator=g)
    txt = torch.randn(1, 5, KLEIN["context_in_dim"], generator=g)
    return img, position_ids(3, 4)[None], txt, text_ids(5)[None], torch.tensor([0.7])


def _run_twice(model, call):
    with torch.inference_mode():
        return [call(model).clone() for _ in range(2)]


@pytest.mark.parametrize("resident_blocks", [0, 2])
def test_klein_streamed_blocks_equal_resident(resident_blocks):
    model = _klein()
    inputs = _klein_inputs()
    want = _run_twice(model, lambda m: m(*inputs))
    off = O.offload(model, "cpu", "blocks", copy=True, resident_blocks=resident_blocks)
    assert len(off.stream_ids) == 5 - resident_blocks and len(off._slots) == 0  # slots come with the first forward
    got = _run_twice(model, lambda m: m(*inputs))  # the second call starts from the wrapped-around prefetch
    assert off.state == "blocks" and len(off._slots) == 2
    assert off.stalls == 1  # only block 0 of the first call waited for its copy; every other one was prefetched
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    # between blocks every streamed block points back at its host buffer; the slots hold the bytes
    blk = model.single_blocks[-1]
    assert blk.linear1.weight.data_ptr() == off.blocks[-1].host.data_ptr() + off.blocks[-1].entries[0].offset


def test_zimage_blocks_refiners_and_layers_equal_resident():
    model = _randomize(ZImageTransformer(ZImageConfig(**ZIMAGE)))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 8, 8, generator=g)
    caps = [torch.randn(7, ZIMAGE["cap_feat_dim"], generator=g)]
    want = _run_twice(model, lambda m: m(x, torch.tensor([0.3]), caps))
    off = O.offload(model, "cpu", "blocks", copy=True)
    assert len(off.blocks) == 2 * ZIMAGE["n_refiner_layers"] + ZIMAGE["n_layers"]
    got = _run_twice(model, lambda m: m(x, torch.tensor([0.3]), caps))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_qwen3_stream_stops_early_and_restarts():
    """The encoder stops after the deepest requested layer: the prefetched next layer is never used, and the next
    call must load layer 0 itself (the slot choice after an unused prefetch)."""
    model = _randomize(Qwen3Encoder(Qwen3Config(**QWEN)))
    ids = torch.randint(0, QWEN["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    calls = [(3, 7), (27,), (5,)]
    with torch.inference_mode():
        want = [model(ids, mask, output_layers=c) for c in calls]
    O.offload(model, "cpu", "blocks", copy=True)
    with torch.inference_mode():
        got = [model(ids, mask, output_layers=c) for c in calls]
    for a, b in zip(got, want):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_quantized_blocks_stream_too():
    """int4 / int8 weights are buffers of other dtypes (uint8, int8, float32 scales) inside a block."""
    model = _klein()
    quantize_model(model, "int4")
    quantize_model(model, "int8")  # no-op on already-quantized layers; keeps the test about mixed dtypes
    inputs = _klein_inputs()
    want = _run_twice(model, lambda m: m(*inputs))
    O.offload(model, "cpu", "blocks", copy=True)
    got = _run_twice(model, lambda m: m(*inputs))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_model_mode_one_component_at_a_time():
    klein = _klein()
    vae = _randomize(Flux2VAE(VAEConfig(**VAE_COMMON)))
    inputs = _klein_inputs()
    z = torch.randn(1, vae.latent_channels, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        want_k, want_v, want_tiled = klein(*inputs), vae.decode(z), vae.decode(z, tile=64)
    ok, ov = O.offload(klein, "cpu", "model", copy=True), O.offload(vae, "cpu", "model", copy=True)
    assert ok.state == ov.state == "host"
    with torch.inference_mode():
        got_k = klein(*inputs)
        assert ok.state == "resident" and ov.state == "host"
        got_v = vae.decode(z)
        assert ok.state == "host" and ov.state == "resident"  # the VAE's decode entry moved the transformer out
        klein(*inputs)
        got_tiled = vae.decode(z, tile=64)  # a tiled decode calls the decoder's parts, never its forward
        assert ok.state == "host" and ov.state == "resident"
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v) and torch.equal(got_tiled, want_tiled)
    assert ok.device_bytes("resident") == ok.host_bytes
    ok.remove("resident")
    ov.remove("host")
    with torch.inference_mode():
        assert torch.equal(klein(*inputs), want_k)


def test_cpu_without_copies_is_resident_compute():
    model = _klein()
    inputs = _klein_inputs()
    want = _run_twice(model, lambda m: m(*inputs))
    off = O.offload(model, "cpu", "blocks")
    assert off.copy is False
    got = _run_twice(model, lambda m: m(*inputs))
    assert off._slots == [] and off.resident == {}
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_device_bytes_and_bad_requests():
    model = _klein(depth=2, single=2)
    off = O.offload(model, "cpu", "blocks", copy=True)
    double = off.blocks[0].nbytes
    assert off.device_bytes("blocks") == off.base.nbytes + 2 * double  # two slots of the largest (double) block
    assert off.device_bytes("host") == 0
    with pytest.raises(ConfigError, match="already offloaded"):
        O.offload(model, "cpu", "model")
    with pytest.raises(ConfigError, match="offload 'model'"):
        O.offload(_randomize(Flux2VAE(VAEConfig(**VAE_COMMON))), "cpu", "blocks")
    with pytest.raises(ConfigError, match="none, model, blocks"):
        O.offload(_klein(), "cpu", "layers")
