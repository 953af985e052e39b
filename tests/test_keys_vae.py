"""Real-size key maps: the diffusers FLUX VAEs on the meta device (docs/MODELS.md §V1, §V2),
converted by our map, must be exactly our meta model's keys and shapes; the LDM names must be what diffusers' own
single-file converter reads; offenders must be named. No weights are allocated."""
import re

import pytest
import torch

from flux_core.errors import WeightError
from flux_core.torch.vae import Flux1VAE, Flux2VAE, config_from_weights
from flux_core.weights import vae as W
from flux_core.torch.common import load_into_torch
from flux_core.weights.keymap import check_strict, shapes
from refs import vae as R

KINDS = {"flux2": Flux2VAE, "flux1": Flux1VAE}


def _ours(kind, native):
    cfg = config_from_weights(native, kind)
    with torch.device("meta"):
        return KINDS[kind](cfg)


@pytest.mark.parametrize("kind", list(KINDS))
def test_real_diffusers_keys_map_onto_our_model(kind):
    ref = R.meta_reference(kind)
    dsd = ref.state_dict()
    native = W.to_native(dsd)
    model = _ours(kind, native)
    check_strict(shapes(model.state_dict()), shapes(native), f"real {kind} VAE")  # raises naming any offender
    # every diffusers tensor was used, except the BN training counter
    assert len(native) == len(dsd) - (1 if kind == "flux2" else 0)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    # structure recovered from shapes equals the reference config
    c, rc = model.config, ref.config
    assert c.enc_channels == c.dec_channels == tuple(rc.block_out_channels)
    assert (c.enc_blocks, c.dec_blocks) == (rc.layers_per_block, rc.layers_per_block + 1)
    assert c.z_channels == rc.latent_channels and c.norm_num_groups == rc.norm_num_groups
    patch = rc.patch_size[0] if kind == "flux2" else 1  # FLUX.2 latents are patchified 2x2 (docs/MODELS.md §V1)
    assert model.downscale == 2 ** (len(rc.block_out_channels) - 1) * patch
    assert model.latent_channels == rc.latent_channels * patch * patch


@pytest.mark.parametrize("kind", list(KINDS))
def test_real_ldm_keys_are_what_diffusers_converter_reads(kind):
    """Our native names, fed to diffusers' `convert_ldm_vae_checkpoint` (FLUX.2 quant convs moved to top level,
    docs/MODELS.md §V3), come back as exactly the diffusers keys and shapes."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ref = R.meta_reference(kind)
    dsd = ref.state_dict()
    native = W.to_native(dsd)
    moved = W.COMFY.from_native(native)
    back = convert_ldm_vae_checkpoint(moved, dict(ref.config))
    back.update({k: v for k, v in moved.items() if k.startswith("bn.")})
    want = {k: v for k, v in dsd.items() if not k.endswith("num_batches_tracked")}
    assert shapes(back) == shapes(want)
    # and the hand-written LDM rename in tests/refs agrees with our map at real size
    hand = R.ldm_state_dict(ref)
    hand.pop("bn.num_batches_tracked", None)
    assert shapes(hand) == shapes(native)


def test_comfy_layout_and_prefixes():
    ref = R.meta_reference("flux2")
    native = W.to_native(ref.state_dict())
    comfy = W.from_native(native, "comfy")
    assert "quant_conv.weight" in comfy and "encoder.quant_conv.weight" not in comfy
    for prefix in ("", "vae.", "first_stage_model."):
        got = W.to_native({prefix + k: v for k, v in comfy.items()})
        assert shapes(got) == shapes(native)
    assert W.detect_kind(native) == "flux2"
    assert W.detect_kind(W.to_native(R.meta_reference("flux1").state_dict())) == "flux1"


def test_decoder_level_reversal_is_generated_for_the_level_count():
    km = W.diffusers_keymap(3)
    got = km.to_native({"decoder.up_blocks.0.resnets.2.conv_shortcut.weight": torch.zeros(1),
                        "decoder.up_blocks.2.upsamplers.0.conv.bias": torch.zeros(1)})
    assert set(got) == {"decoder.up.2.block.2.nin_shortcut.weight", "decoder.up.0.upsample.conv.bias"}


def test_offenders_are_named():
    ref = R.meta_reference("flux1")
    native = W.to_native(ref.state_dict())
    model = _ours("flux1", native)
    bad = dict(native)
    del bad["decoder.up.2.block.1.conv1.weight"]
    bad["decoder.up.2.block.1.conv9.weight"] = torch.empty(1, device="meta")
    bad["encoder.mid.attn_1.q.weight"] = torch.empty(512, 512, device="meta")
    with pytest.raises(WeightError) as e:
        load_into_torch(model, bad, "FLUX.1 VAE")
    msg = str(e.value)
    for key in ("decoder.up.2.block.1.conv1.weight", "decoder.up.2.block.1.conv9.weight",
                "encoder.mid.attn_1.q.weight"):
        assert re.search(re.escape(key), msg), key
