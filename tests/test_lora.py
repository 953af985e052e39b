"""LoRA merging on torch and MLX against the fixture generator's ground truth (tests/lora_fixtures.py).

Every format the real tools write, for tiny klein and Z-Image models: merged weight == W + Σ s·ΔW computed in
float64 from the stored tensors (≤ 1e-6 relative, float32), MLX == torch (≤ 1e-6), plus the pitfalls of
docs/LORA.md: fused qkv with ranks divisible by 3, musubi Z-Image attention, the klein final-layer half swap,
fused + split duplicates, α conventions, refusals, several LoRAs, strength changes and exact restore.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rel_err
from lora_fixtures import Fixture, expected_weights, klein_fixtures, save, zimage_fixtures

from flux_core import models
from flux_core.errors import WeightError
from flux_core.lora import parse_lora_arg, read_lora
from flux_core.torch import lora as TL

KLEIN_FORMATS = ["ai_toolkit", "bfl_down_up", "kohya", "kohya_sparse", "diffusers", "diffusers_rslora", "fal",
                 "diffsynth", "comfy", "lokr_full", "lokr_factor", "loha", "dora_scale", "dora_peft",
                 "dora_magnitude", "diff"]
ZIMAGE_FORMATS = ["ai_toolkit", "musubi", "musubi_comfy", "musubi_diffusers", "diffusers", "diffusers_rslora",
                  "diffsynth", "comfy", "lokr_full", "lokr_factor", "loha", "dora_scale", "dora_peft", "diff"]


def _build(family: str, root: Path):
    if family == "klein":
        from refs import klein as rk

        path = rk.save_bfl(rk.build_reference(seed=1), root / "klein.safetensors")
    else:
        from refs import zimage as rz

        path = rz.save_layouts(rz.build_reference(seed=1), root)["original"]
    model = models.load_transformer(path, backend="torch", device="cpu", dtype="float32")
    shapes = TL.weight_shapes(model.module)
    base = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    make = klein_fixtures if family == "klein" else zimage_fixtures
    fixtures = make(shapes, base)
    files = {name: save(fx, root) for name, fx in fixtures.items()}
    return dict(path=path, model=model, shapes=shapes, base=base, fixtures=fixtures, files=files, root=root)


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    return _build("klein", tmp_path_factory.mktemp("lora_klein"))


@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    return _build("zimage", tmp_path_factory.mktemp("lora_zimage"))


def _err(got: dict, want: dict) -> float:
    return max(float(np.abs(np.asarray(got[k], dtype=np.float64) - want[k]).max() / max(np.abs(want[k]).max(), 1e-12))
               for k in want)


def _torch_weights(model) -> dict:
    return {k: v.detach().double().numpy() for k, v in model.state_dict().items()}


def _check(setup, combo):
    """Apply [(fixture name, strength)] on torch; compare with the float64 truth."""
    mod = setup["model"].module
    TL.apply_loras(mod, [(setup["files"][n], s) for n, s in combo])
    want = expected_weights(setup["base"], [(setup["fixtures"][n], s) for n, s in combo])
    changed = sum(not torch.equal(mod.state_dict()[k], setup["base"][k]) for k in want)
    return _err(_torch_weights(mod), want), changed


@pytest.mark.parametrize("fmt", KLEIN_FORMATS)
def test_klein_format_merges_exactly(klein, fmt):
    err, changed = _check(klein, [(fmt, 0.8)])
    assert err <= 1e-6, f"{fmt}: merged weights differ from W + s·ΔW by {err:.2e}"
    keys = {e.key for e in klein["fixtures"][fmt].expect}
    assert changed == len(keys), f"{fmt}: {changed} weights changed, {len(keys)} expected"


@pytest.mark.parametrize("fmt", ZIMAGE_FORMATS)
def test_zimage_format_merges_exactly(zimage, fmt):
    err, changed = _check(zimage, [(fmt, 0.8)])
    assert err <= 1e-6, f"{fmt}: merged weights differ from W + s·ΔW by {err:.2e}"
    keys = {e.key for e in zimage["fixtures"][fmt].expect}
    assert changed == len(keys)


def test_several_loras_strengths_change_and_restore(klein):
    """Σ s_i·ΔW_i for three LoRAs (one DoRA, applied in order); a strength change re-merges only that LoRA's weights;
    removing all restores the original tensors bit for bit, without re-reading the checkpoint."""
    mod = klein["model"].module
    combo = [("kohya", 0.5), ("diffusers", -0.7), ("dora_peft", 1.0)]
    err, _ = _check(klein, combo)
    assert err <= 1e-6
    combo2 = [("kohya", 1.3), ("diffusers", -0.7), ("dora_peft", 1.0)]
    err, _ = _check(klein, combo2)
    assert err <= 1e-6
    err, _ = _check(klein, [("kohya", 0.0)])
    assert err <= 1e-6
    assert TL.backup_bytes(mod) > 0
    TL.apply_loras(mod, [])
    for k, v in klein["base"].items():
        assert torch.equal(mod.state_dict()[k], v), k
    assert TL.backup_bytes(mod) == 0


def test_strength_change_touches_only_that_loras_weights(klein):
    mod = klein["model"].module
    a = TL.resolve_for(mod, klein["files"]["kohya"])          # block Linears
    b = TL.resolve_for(mod, klein["files"]["diff"])           # block and global Linears
    TL.apply_loras(mod, [(a, 1.0), (b, 1.0)])
    only_b = set(b.keys) - set(a.keys)
    assert TL.apply_loras(mod, [(a, 1.0), (b, 0.5)]) == len(set(a.keys) | set(b.keys))
    assert TL.apply_loras(mod, [(a, 1.0), (b, 0.5)]) == 0
    TL.apply_loras(mod, [(b, 0.5)])
    assert only_b and TL.apply_loras(mod, [])
    # backups: exactly the touched weights, at their stored size
    TL.apply_loras(mod, [(a, 1.0)])
    sd = mod.state_dict()
    assert TL.backup_bytes(mod) == sum(sd[k].numel() * sd[k].element_size() for k in a.keys)
    TL.apply_loras(mod, [])


# ------------------------------------------------------------------------------------------------ pitfalls

def test_fused_qkv_ranks_divisible_by_three(klein):
    """mflux slices A into thirds when rank % 3 == 0; a dense fused-qkv LoRA of rank 3 and 6 must not be split."""
    fx = klein["fixtures"]["ai_toolkit"]
    ranks = {fx.sd[k].shape[0] for k in fx.sd if "attn.qkv" in k and k.endswith("lora_A.weight")}
    assert ranks & {3, 6}, f"fixture qkv ranks {ranks} do not exercise rank % 3 == 0"
    err, _ = _check(klein, [("ai_toolkit", 1.0)])
    assert err <= 1e-6


def test_klein_final_layer_halves_are_swapped(klein):
    """A diffusers `norm_out.linear` LoRA is [scale; shift]; ours is [shift; scale]. Not swapping must fail."""
    fx = klein["fixtures"]["diffusers"]
    e = next(e for e in fx.expect if e.key == "final_layer.adaLN_modulation.1.weight")
    assert e.swap
    h = e.delta.shape[0] // 2
    assert np.abs(e.delta[:h] - e.delta[h:]).max() > 1e-3   # asymmetric halves, so a missing swap is visible
    err, _ = _check(klein, [("diffusers", 1.0)])
    assert err <= 1e-6


def test_musubi_zimage_attention_is_applied(zimage):
    """Raw musubi `lora_unet_layers_N_attention_to_q`: ComfyUI loads only the feed-forward part; we load all."""
    fx = zimage["fixtures"]["musubi"]
    assert any("attention_to_q" in k for k in fx.sd)
    TL.apply_loras(zimage["model"].module, [(zimage["files"]["musubi"], 1.0)])
    sd = zimage["model"].module.state_dict()
    assert not torch.equal(sd["layers.0.attention.qkv.weight"], zimage["base"]["layers.0.attention.qkv.weight"])
    assert read_lora(zimage["files"]["musubi"]).n_tensors == 3 * len(fx.expect)
    TL.apply_loras(zimage["model"].module, [])


def test_fused_and_split_duplicates_apply_once(zimage, caplog):
    """Some Z-Image kohya files hold `attention_qkv` AND `attention_to_q/k/v` for the same layer: use the split set."""
    split = zimage["fixtures"]["musubi"]
    fused = zimage["fixtures"]["musubi_comfy"]
    both = Fixture("dup", {**split.sd, **fused.sd})
    path = save(both, zimage["root"])
    with caplog.at_level(logging.WARNING, logger="flux_core.lora"):
        res = TL.resolve_for(zimage["model"].module, path)
    assert "fused entries skipped" in caplog.text
    TL.apply_loras(zimage["model"].module, [(res, 1.0)])
    want = expected_weights(zimage["base"], [(split, 1.0)])
    assert _err(_torch_weights(zimage["model"].module), want) <= 1e-6
    TL.apply_loras(zimage["model"].module, [])


def test_lokr_full_rank_alpha_is_ignored(klein):
    """ai-toolkit's full LoKr stores α ≈ 1e10 (inf in fp16): applying α/dim would blow the weights up."""
    fx = klein["fixtures"]["lokr_full"]
    alpha = next(v for k, v in fx.sd.items() if k.endswith(".alpha"))
    assert not torch.isfinite(alpha.float())
    err, _ = _check(klein, [("lokr_full", 1.0)])
    assert err <= 1e-6


# ------------------------------------------------------------------------------------------------ errors, reports

def test_zimage_lora_on_klein_is_refused(klein, zimage):
    with pytest.raises(WeightError, match=r"ai_toolkit.safetensors is a LoRA for Z-Image.*FLUX.2 \[klein\]"):
        TL.resolve_for(klein["model"].module, zimage["files"]["ai_toolkit"])
    with pytest.raises(WeightError, match="is a LoRA for FLUX.2 \\[klein\\].*Z-Image"):
        TL.resolve_for(zimage["model"].module, klein["files"]["kohya"])


def test_flux1_and_other_size_loras_are_refused(klein, tmp_path):
    sd = {"lora_unet_double_blocks_0_img_mod_lin.lora_down.weight": torch.zeros(4, 64),
          "lora_unet_double_blocks_0_img_mod_lin.lora_up.weight": torch.zeros(384, 4),
          "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 64),
          "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(192, 4)}
    path = save(Fixture("flux1", sd), tmp_path)
    with pytest.raises(WeightError, match="flux1.safetensors is a LoRA for FLUX.1"):
        TL.resolve_for(klein["model"].module, path)
    # a klein LoRA of another width (the 9B is 4096 wide, the 4B 3072)
    wide = {"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(4, 96),
            "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(288, 4)}
    path = save(Fixture("wide", wide), tmp_path)
    with pytest.raises(WeightError, match=r"wide.safetensors is a LoRA for FLUX.2 \[klein\] \(hidden size 96\)"):
        TL.resolve_for(klein["model"].module, path)


def test_unrecognised_and_text_encoder_keys_are_reported(klein, caplog):
    fx = klein["fixtures"]["kohya"]
    extra = {"lora_unet_not_a_module.lora_down.weight": torch.zeros(2, 8),
             "lora_unet_not_a_module.lora_up.weight": torch.zeros(8, 2),
             "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8),
             "text_encoders.qwen3_4b.transformer.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 8),
             "some_junk": torch.zeros(1)}
    path = save(Fixture("partial", {**fx.sd, **extra}), klein["root"])
    with caplog.at_level(logging.WARNING, logger="flux_core.lora"):
        res = TL.resolve_for(klein["model"].module, path)
    n = len(fx.sd)
    assert f"applied {n}/{n + 5} tensors" in caplog.text
    assert "3 not recognised: " in caplog.text and "lora_unet_not_a_module" in caplog.text
    assert "2 text-encoder tensors skipped" in caplog.text
    assert res.report.applied == n


def test_nothing_matching_is_an_error(klein, tmp_path):
    path = save(Fixture("junk", {"foo.lora_A.weight": torch.zeros(2, 8), "foo.lora_B.weight": torch.zeros(8, 2)}),
                tmp_path)
    with pytest.raises(WeightError, match="no tensor of this LoRA matches"):
        TL.resolve_for(klein["model"].module, path)


def test_pickle_lora_is_refused(tmp_path):
    p = tmp_path / "old.ckpt"
    torch.save({"a": torch.zeros(1)}, p)
    with pytest.raises(WeightError, match="pickle"):
        read_lora(p)
    q = tmp_path / "renamed.safetensors"
    q.write_bytes(p.read_bytes())
    with pytest.raises(WeightError, match="safetensors"):
        read_lora(q)


def test_lora_argument_parsing():
    assert parse_lora_arg("a.safetensors") == parse_lora_arg("a.safetensors:1")
    assert parse_lora_arg("a.safetensors:0.75").strength == 0.75
    assert parse_lora_arg("x/y.safetensors:-1.5e-1").strength == -0.15
    s = parse_lora_arg(r"C:\loras\style.safetensors")
    assert (s.path, s.strength) == (r"C:\loras\style.safetensors", 1.0)
    s = parse_lora_arg(r"C:\loras\style.safetensors:0.5")
    assert (s.path, s.strength) == (r"C:\loras\style.safetensors", 0.5)
    assert parse_lora_arg("/mnt/a:b/c.safetensors").path == "/mnt/a:b/c.safetensors"


def test_peft_alpha_pattern_matches_whole_module_names(klein):
    """rank / alpha patterns match the END of a module path after a dot: `transformer_blocks.0.attn.to_k` must not
    also catch `single_transformer_blocks.0.attn.to_k`."""
    from flux_core.lora.formats import PeftAlpha

    p = PeftAlpha(4.0, {"transformer_blocks.0.attn.to_k": 8.0}, False)
    assert p.scale("transformer_blocks.0.attn.to_k", 4) == 2.0
    assert p.scale("single_transformer_blocks.0.attn.to_k", 4) == 1.0
    assert PeftAlpha(None, {}, True).scale("x", 4) == 2.0   # α = r, rsLoRA: r / √r


# ------------------------------------------------------------------------------------------------ models API

def test_load_transformer_with_loras_shares_one_base(klein):
    """load_transformer(loras=...) reads the checkpoint once: every LoRA list is a handle on the same module, made
    active when loaded; the base handle takes the LoRAs out again; a strength is part of the handle's key."""
    from flux_core import models

    path, files = klein["path"], klein["files"]
    kw = dict(backend="torch", device="cpu", dtype="float32")
    base = models.load_transformer(path, **kw)
    a = models.load_transformer(path, loras=[(files["kohya"], 0.5), (files["diffusers"], -0.7)], **kw)
    assert a.module is base.module and a.loras[0].strength == 0.5 and "LoRA kohya.safetensors:0.5" in a.describe()
    want = expected_weights(klein["base"], [(klein["fixtures"]["kohya"], 0.5), (klein["fixtures"]["diffusers"], -0.7)])
    assert _err(_torch_weights(base.module), want) <= 1e-6
    assert models.load_transformer(path, loras=[(files["kohya"], 0.5), (files["diffusers"], -0.7)], **kw) is a
    b = models.load_transformer(path, loras=[(files["kohya"], 1.0)], **kw)
    assert b is not a and b.module is base.module
    assert _err(_torch_weights(base.module), expected_weights(klein["base"], [(klein["fixtures"]["kohya"], 1.0)])) <= 1e-6
    assert models.load_transformer(path, **kw) is base
    for k, v in klein["base"].items():
        assert torch.equal(base.module.state_dict()[k], v)
    assert any("applied" in n for n in b.notes)


def test_wrong_lora_fails_before_any_weight_changes(klein, zimage):
    from flux_core import models

    kw = dict(backend="torch", device="cpu", dtype="float32")
    with pytest.raises(WeightError, match="is a LoRA for Z-Image"):
        models.load_transformer(klein["path"], loras=[(klein["files"]["kohya"], 1.0),
                                                      (zimage["files"]["ai_toolkit"], 1.0)], **kw)
    for k, v in klein["base"].items():
        assert torch.equal(klein["model"].module.state_dict()[k], v)


@pytest.mark.parametrize("mode", ["blocks", "model"])
def test_offloaded_model_merges_into_the_host_masters(klein, mode):
    """With offload the host buffers are the masters and device copies are remade from them on every entry: a merge
    must land there (a merge into the current device copy would vanish at the next activation). CPU copies stand in
    for a GPU (copy=True), as in the offload tests."""
    from refs import klein as rk

    from flux_core import models
    from flux_core.torch.offload import offload

    tr = models.load_transformer(klein["path"], backend="torch", device="cpu", dtype="float32")
    x = rk.inputs(seed=3, ctx=48)
    args = (x["img"], x["img_ids"][None], x["txt"], x["txt_ids"][None], x["timesteps"])
    plain = models.with_loras(tr, [(klein["files"]["kohya"], 0.9)])
    with torch.inference_mode():
        want = tr.module(*args).clone()
    merged = {k: v.clone() for k, v in tr.module.state_dict().items()}
    models.with_loras(tr)
    with torch.inference_mode():
        base_out = tr.module(*args).clone()
    import copy as _copy

    twin = _copy.deepcopy(tr.module)
    off = offload(twin, "cpu", mode, copy=True)
    with torch.inference_mode():
        twin(*args)       # weights now in device copies
    TL.apply_loras(twin, [(klein["files"]["kohya"], 0.9)])
    with torch.inference_mode():
        got = twin(*args)
        off.to_state("host")
        again = twin(*args)   # remade from the host masters
    # The merged weights are bit for bit the plain merge's; the outputs are compared with a tolerance because
    # two model instances on the CPU need not round alike: MKL's M=1 products (time_in) depend on where the
    # operands sit in memory (docs/NOTES.md). A merge that vanished would give the LoRA-free output, far outside it.
    assert all(torch.equal(v, merged[k]) for k, v in twin.state_dict().items())
    assert rel_err(got, want) < 1e-5 and rel_err(again, want) < 1e-5
    assert rel_err(base_out, want) > 1e-3
    assert plain.loras
