"""FLUX.2 [klein] transformer: parity with diffusers' Flux2Transformer2DModel at a tiny random-weight config.

Tolerance: <= 1e-5 relative (max|ours - ref| / max|ref|), float32 CPU. Both implementations do the same float32
operations in the same order, so the measured error is round-off only (0.0 on the machine this was written on).
"""
import pytest
import torch

from conftest import rel_err
from refs import klein as R

from flux_core.errors import WeightError
from flux_core.torch.klein import (Flux2Transformer, KleinConfig, load_klein, position_ids, rope_table,
                                   text_ids)
from flux_core.weights import klein as K
from flux_core.weights.io import load_checkpoint, save_safetensors

TOL = 1e-5


@pytest.fixture(scope="module")
def ref():
    return R.build_reference(seed=0)


@pytest.fixture(scope="module")
def files(ref, tmp_path_factory):
    """The reference weights in every layout a user may hand us."""
    d = tmp_path_factory.mktemp("klein")
    pipe_root = d / "pipeline"
    component = R.save_diffusers(ref, pipe_root)
    return {
        "diffusers_pipeline_folder": pipe_root,
        "diffusers_component_folder": component,
        "bfl_file": R.save_bfl(ref, d / "klein.safetensors"),
        "bfl_file_comfy_prefix": R.save_bfl(ref, d / "klein_prefixed.safetensors", prefix="model.diffusion_model."),
        "bfl_file_norm_weight": R.save_bfl(ref, d / "klein_normw.safetensors", norm_suffix="weight"),
    }


@pytest.fixture(scope="module")
def ours(files):
    return load_klein(files["bfl_file"])


def _run(model, x, **kw):
    with torch.no_grad():
        return model(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], **kw)


# ------------------------------------------------------------------------------------------------ key layouts

def test_bfl_fixture_is_what_diffusers_converter_expects(ref):
    """Our hand-written BFL writer is the exact inverse of diffusers' own converter (keys and tensors)."""
    sd = ref.state_dict()
    back = R.diffusers_converter(R.diffusers_to_bfl(sd))
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_our_map_equals_independent_bfl_layout(ref):
    sd = ref.state_dict()
    bfl = R.diffusers_to_bfl(sd)
    native = K.to_native(sd)
    assert set(native) == set(bfl)
    assert all(torch.equal(native[k], bfl[k]) for k in bfl)
    # and the map runs backwards to the diffusers layout (used to write demo / fixture files)
    back = K.DIFFUSERS.from_native(bfl)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_sorted_key_order_is_handled(ref):
    """safetensors returns keys sorted, so to_k / add_k_proj come before to_q / add_q_proj (the first cat source)."""
    sd = ref.state_dict()
    native = K.to_native({k: sd[k] for k in sorted(sd)})
    assert set(native) == set(R.diffusers_to_bfl(sd))


def test_detect_layout(ref):
    sd = ref.state_dict()
    assert K.detect_layout(sd) == "diffusers"
    assert K.detect_layout(R.diffusers_to_bfl(sd)) == "bfl"
    flux1_like = {k: v for k, v in R.diffusers_to_bfl(sd).items() if "stream_modulation" not in k}
    with pytest.raises(WeightError, match="FLUX.1"):
        K.detect_layout(flux1_like)
    with pytest.raises(WeightError, match="not a FLUX.2"):
        K.detect_layout({"model.layers.0.self_attn.q_proj.weight": torch.zeros(1)})


@pytest.mark.parametrize("layout", ["diffusers_pipeline_folder", "diffusers_component_folder", "bfl_file",
                                    "bfl_file_comfy_prefix", "bfl_file_norm_weight", "checkpoint_object"])
def test_every_layout_loads_the_same_weights(ref, files, ours, layout):
    src = load_checkpoint(files["diffusers_component_folder"]) if layout == "checkpoint_object" else files[layout]
    model = load_klein(src)
    assert model.config == ours.config
    a, b = model.state_dict(), ours.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = R.inputs(seed=3)
    assert rel_err(_run(model, x), R.reference_forward(ref, x)) <= TOL


def test_config_from_shapes_equals_config_json(files):
    ckpt = load_checkpoint(files["diffusers_component_folder"])
    native = K.to_native(ckpt.sd)
    from_json = KleinConfig.from_state_dict(native, ckpt.config)
    from_shapes = KleinConfig.from_state_dict(native)
    assert from_json == from_shapes
    assert (from_shapes.hidden_size, from_shapes.num_heads, from_shapes.head_dim) == (64, 4, 16)
    assert (from_shapes.depth, from_shapes.depth_single, from_shapes.context_in_dim) == (2, 2, 48)
    assert from_shapes.axes_dim == tuple(R.TINY["axes_dims_rope"]) and not from_shapes.guidance_embed


# ------------------------------------------------------------------------------------------------ parity

@pytest.mark.parametrize("refs,batch,batched_ids", [
    ((), 1, False),
    ((), 2, True),                      # [B, N, 4] ids, as the pipeline passes them
    (((2, 3),), 1, False),              # one reference image, t = 10
    (((2, 3), (4, 2)), 2, False),       # two references of different sizes, t = 10, 20
])
def test_parity_with_diffusers(ref, ours, refs, batch, batched_ids):
    x = R.inputs(n_img=(3, 5), n_txt=7, batch=batch, refs=refs, seed=batch + len(refs))
    want = R.reference_forward(ref, x)
    if batched_ids:
        x = dict(x, img_ids=x["img_ids"].expand(batch, -1, -1), txt_ids=x["txt_ids"].expand(batch, -1, -1))
    got = _run(ours, x)
    assert got.shape == want.shape == (batch, x["img"].shape[1], 16)
    assert rel_err(got, want) <= TOL


def test_reference_tokens_change_the_noise_rows(ours):
    """Guards against a model that ignores the appended reference tokens (e.g. slicing them off too early)."""
    x = R.inputs(refs=((2, 3),), seed=5)
    n = 15
    plain = dict(x, img=x["img"][:, :n], img_ids=x["img_ids"][:n])
    assert (_run(ours, x)[:, :n] - _run(ours, plain)).abs().max() > 1e-3


def test_pe_reuse_is_identical(ours):
    x = R.inputs(refs=((2, 2),), batch=2, seed=7)
    pe = ours.make_pe(x["img_ids"], x["txt_ids"])
    for sigma in (x["timesteps"], torch.tensor([0.3, 0.9])):
        y = dict(x, timesteps=sigma)
        assert torch.equal(_run(ours, y, pe=pe), _run(ours, y))


def test_rope_table_matches_diffusers_posembed():
    from diffusers.models.transformers.transformer_flux2 import Flux2PosEmbed

    img, txt = torch.cat([position_ids(3, 4), position_ids(2, 2, t=10)]), text_ids(5)
    cos, sin = Flux2PosEmbed(theta=2000, axes_dim=[32, 32, 32, 32])(torch.cat([txt, img]))
    pe = rope_table(img, txt, (32, 32, 32, 32), 2000.0)
    assert pe.dtype == torch.float32 and pe.shape == (1, 5 + 16, 64, 2)
    assert torch.equal(pe[0, :, :, 0].repeat_interleave(2, -1), cos)
    assert torch.equal(pe[0, :, :, 1].repeat_interleave(2, -1), sin)


def test_guidance_embedder_variant():
    """FLUX.2-dev-style guidance_in: mapped, detected from the keys and used like diffusers (guidance x 1000)."""
    ref = R.build_reference(seed=1, guidance_embeds=True)
    model = load_klein(ref.state_dict())
    assert model.config.guidance_embed and model.guidance_in is not None
    x = R.inputs(seed=2)
    g = torch.tensor([3.5])
    with torch.no_grad():
        want = ref(hidden_states=x["img"], encoder_hidden_states=x["txt"], timestep=x["timesteps"], guidance=g,
                   img_ids=x["img_ids"], txt_ids=x["txt_ids"], return_dict=False)[0]
    assert rel_err(_run(model, x, guidance=g), want) <= TOL


def test_bfloat16_load_runs_close_to_float32(files, ours):
    model = load_klein(files["bfl_file"], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    x = R.inputs(seed=9)
    got = _run(model, x)
    assert got.dtype == torch.bfloat16
    assert rel_err(got.float(), _run(ours, x)) < 5e-2   # bf16 has an 8-bit mantissa; a wrong op is off by O(1)


def test_position_ids_match_the_diffusers_pipeline():
    from diffusers import Flux2KleinPipeline as P

    assert torch.equal(position_ids(3, 5), P._prepare_latent_ids(torch.zeros(1, 16, 3, 5))[0])
    refs = [torch.zeros(1, 16, 2, 3), torch.zeros(1, 16, 4, 2)]
    want = P._prepare_image_ids(refs)[0]
    assert torch.equal(torch.cat([position_ids(2, 3, t=10), position_ids(4, 2, t=20)]), want)
    assert torch.equal(text_ids(7), P._prepare_text_ids(torch.zeros(1, 7, 8))[0])


# ------------------------------------------------------------------------------------------------ bad files

def _bfl(ref):
    return {"model.diffusion_model." + k: v for k, v in R.diffusers_to_bfl(ref.state_dict()).items()}


def test_missing_key_is_named(ref):
    sd = _bfl(ref)
    del sd["model.diffusion_model.single_blocks.1.linear2.weight"]
    with pytest.raises(WeightError, match=r"missing keys \(1\): single_blocks\.1\.linear2\.weight"):
        load_klein(sd)


def test_unexpected_key_is_named(ref):
    sd = _bfl(ref)
    sd["model.diffusion_model.double_blocks.0.img_attn.qkv.bias"] = torch.zeros(192)
    with pytest.raises(WeightError, match=r"unexpected keys \(1\): double_blocks\.0\.img_attn\.qkv\.bias"):
        load_klein(sd)


def test_wrong_shape_is_named(ref):
    sd = _bfl(ref)
    sd["model.diffusion_model.double_blocks.1.txt_mlp.2.weight"] = torch.zeros(64, 191)
    with pytest.raises(WeightError, match=r"wrong shapes \(1\): double_blocks\.1\.txt_mlp\.2\.weight"):
        load_klein(sd)


def test_truncated_diffusers_folder_is_named(ref, tmp_path):
    sd = ref.state_dict()
    sd.pop("transformer_blocks.1.attn.add_v_proj.weight")
    save_safetensors(sd, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightError, match="add_v_proj"):
        load_klein(tmp_path)


def test_not_a_transformer_file(tmp_path):
    save_safetensors({"decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}, tmp_path / "vae.safetensors")
    with pytest.raises(WeightError, match="not a FLUX.2"):
        load_klein(tmp_path / "vae.safetensors")


def test_meta_construction_allocates_nothing():
    with torch.device("meta"):
        m = Flux2Transformer(KleinConfig())
    assert all(p.is_meta for p in m.parameters())
