"""Offload and VAE tiling through the library API: placement decisions with faked free memory, refusals, and a whole
generation with every component offloaded (copies forced on the CPU) equal to the plain one, bit for bit."""
import numpy as np
import pytest

from flux_core import backend as backends
from flux_core import memory, models, pipeline
from flux_core.demo import write_demo_checkpoints
from flux_core.errors import ConfigError
from flux_core.torch import offload as O


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_checkpoints(tmp_path_factory.mktemp("demo"))


def _cuda_choice():
    return backends.Choice("torch", "cuda", "test")


def test_placement_from_free_memory(demo, monkeypatch):
    path = demo["klein"]
    specs = memory.checkpoint_specs(path, "transformer")
    none_need = memory.need_bytes(specs, "transformer", "bfloat16")
    blocks_need = memory.need_bytes(specs, "transformer", "bfloat16", offload="blocks")
    for free, want in [(none_need + 1, "none"), (blocks_need + 1, "blocks")]:
        monkeypatch.setattr(backends, "free_bytes", lambda choice, free=free: free)
        mode, load_choice, why, _ = models._placement(path, "transformer", _cuda_choice(), "bfloat16", "none", "auto")
        assert mode == want and load_choice.device == ("cuda" if want == "none" else "cpu"), why
    monkeypatch.setattr(backends, "free_bytes", lambda choice: int(0.5e9))
    with pytest.raises(ConfigError, match=r"needs 1\.0 GB, 0\.5 GB free: no quantization / offload combination"):
        models._placement(path, "transformer", _cuda_choice(), "bfloat16", "none", "none")


def test_offload_refused_where_nothing_moves(demo):
    with pytest.raises(ConfigError, match="nothing to move"):
        models.load_transformer(demo["klein"], "torch", "cpu", "float32", offload="blocks")
    m = models.load_transformer(demo["klein"], "torch", "cpu", "float32", offload="auto")
    assert m.offload == "none" and any("offload none" in n for n in m.notes)


def test_decode_tile_option(demo):
    vae = models.load_vae(demo["flux2_vae"], "torch", "cpu", "float32")
    lat = np.random.default_rng(0).standard_normal((1, vae.module.latent_channels, 8, 8)).astype(np.float32)
    whole = pipeline.decode(vae, lat, "off")
    assert np.array_equal(pipeline.decode(vae, lat, "auto"), whole)  # 128 px: auto keeps one pass
    tiled = pipeline.decode(vae, lat, 64)
    assert tiled.shape == whole.shape and not np.array_equal(tiled, whole)
    assert np.abs(tiled - whole).mean() < 0.1


@pytest.mark.slow
def test_generation_with_everything_offloaded_matches_resident(demo):
    def run():
        tr = models.load_transformer(demo["klein"], "torch", "cpu", "float32")
        te = models.load_text_encoder(demo["text_encoder"], str(demo["tokenizer"]), "torch", "cpu", "float32")
        vae = models.load_vae(demo["flux2_vae"], "torch", "cpu", "float32")
        return tr, te, vae, pipeline.generate(tr, te, vae, "a red fox", seed=3, width=64, height=48,
                                              release_text_encoder=False)

    models.release()
    tr, te, vae, want = run()
    # the cached modules, wrapped as a CUDA machine would have them (copies forced: real slot and device buffers)
    offs = [O.offload(te.module.model, "cpu", "blocks", copy=True), O.offload(tr.module, "cpu", "blocks", copy=True),
            O.offload(vae.module, "cpu", "model", copy=True)]
    from flux_core.text import clear_embedding_cache

    clear_embedding_cache()  # make the encoder run again, through its offloader
    got = run()[3]
    # the same weights and kernels; equal to float32 round-off, not bit for bit: MKL's M=1 products (the time
    # embedding) round with the weights' addresses, and the offload buffers sit elsewhere than the loaded file's
    # tensors (docs/NOTES.md, Tests). A component that ran without its weights would be far off.
    assert np.abs(np.asarray(got.images) - np.asarray(want.images)).max() < 1e-5
    assert offs[2].state == "resident" and offs[0].state == offs[1].state == "host"  # one component at a time
    models.release()


def test_auto_takes_turns_with_offloaded_components(demo, monkeypatch):
    """A component that fits is still offloaded (model) when another one on the device is: that one measured the
    free memory without it and must not find it resident when it runs."""
    import types

    monkeypatch.setattr(backends, "free_bytes", lambda choice: int(100e9))
    mode, _, _, spare = models._placement(demo["flux2_vae"], "vae", _cuda_choice(), "bfloat16", "none", "auto")
    assert mode == "none" and spare > 90e9
    monkeypatch.setattr(models, "cached_models", lambda: [types.SimpleNamespace(offload="blocks", device="cuda")])
    mode, load_choice, why, _ = models._placement(demo["flux2_vae"], "vae", _cuda_choice(), "bfloat16", "none", "auto")
    assert mode == "model" and load_choice.device == "cpu" and "take turns" in why
    # an explicit choice is kept
    assert models._placement(demo["flux2_vae"], "vae", _cuda_choice(), "bfloat16", "none", "none")[0] == "none"


def test_spare_memory_keeps_blocks_resident(demo):
    from flux_core.torch import loaders
    from flux_core.torch.klein import load_klein

    m = load_klein(demo["klein"])
    block = sum(t.numel() * t.element_size() for t in m.single_blocks[0].parameters())
    note = loaders.offload(m, "cpu", "blocks", spare_bytes=int(3 * block / 0.7) + 1)
    off = O.offloader_of(m)
    assert len(off.blocks) - len(off.stream_ids) >= 2 and "blocks streamed" in note


def test_node_memory_outside_comfyui(demo, monkeypatch):
    import types

    from nodes import memory as node_memory

    m = models.load_vae(demo["flux2_vae"], "torch", "cpu", "float32")
    assert node_memory.use(m) is False and node_memory.patcher_for(m) is None  # no ComfyUI, and a CPU model
    assert node_memory.resolve_offload("auto") == "auto" and node_memory.resolve_offload("none") == "none"
    off = types.SimpleNamespace(stream_ids=[0, 1], mode="model", device_bytes=lambda state=None: 100)
    assert node_memory.target_state(off, 100) == "resident" and node_memory.target_state(off, 99) == "blocks"
    monkeypatch.setattr(node_memory, "lowvram", lambda: True)
    assert node_memory.target_state(off, 10**12) == "blocks" and node_memory.resolve_offload("auto") == "blocks"
    assert node_memory.target_state(types.SimpleNamespace(stream_ids=[], mode="model"), 0) == "resident"
