"""Real-size Qwen3-4B (klein-4B, Z-Image) and Qwen3-8B (klein-9B) key lists vs our model, on the meta device.

The reference key/shape list is transformers' own Qwen3ForCausalLM built with the published config.json sizes.
"""
import pytest
import torch

from flux_core.errors import WeightError
from flux_core.torch.qwen3 import Qwen3Config, Qwen3Encoder, load_qwen3
from flux_core.weights import qwen3 as qwen3_keys
from flux_core.weights.io import Checkpoint
from flux_core.weights.keymap import shapes
from refs import qwen3 as R

CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim")


@pytest.fixture(scope="module", params=["4b", "8b"])
def real(request):
    return request.param, R.hf_meta_state_dict(request.param)


def test_config_detected_from_shapes(real):
    size, sd = real
    cfg = Qwen3Config.from_state_dict(qwen3_keys.to_native(sd))
    for f in CONFIG_FIELDS:
        assert getattr(cfg, f) == R.REAL[size][f], f
    assert cfg.rope_theta == 1e6


@pytest.mark.parametrize("naming", ["causal_lm", "model"])
def test_meta_model_keys_and_shapes_match_100_percent(real, naming):
    _, sd = real
    if naming == "model":  # Qwen3Model (Z-Image text_encoder/): no prefix, no lm_head
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    native = qwen3_keys.to_native(sd)
    with torch.device("meta"):
        ours = Qwen3Encoder(Qwen3Config.from_state_dict(native))
    assert shapes(ours.state_dict()) == shapes(native)
    assert set(sd) - {"model." + k for k in native} - set(native) <= {"lm_head.weight"}  # only lm_head was dropped


def test_full_loader_on_meta(real):
    _, sd = real
    enc = load_qwen3(Checkpoint(dict(sd), None, {}, "meta"), dtype=torch.bfloat16, device="meta", max_layers=27)
    assert len(enc.layers) == 27 and enc.norm is None
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in enc.parameters())
    expected = {k for k in qwen3_keys.to_native(sd)
                if not (k.startswith("norm.") or (qwen3_keys.layer_index(k) or 0) >= 27)}
    assert set(enc.state_dict()) == expected


@pytest.mark.parametrize("edit, needle", [
    ("drop", r"missing keys \(1\): layers\.7\.mlp\.up_proj\.weight"),
    ("add", r"unexpected keys \(1\): layers\.3\.self_attn\.q_proj\.bias"),
    ("shape", r"layers\.2\.self_attn\.k_norm\.weight file \(64,\) vs model \(128,\)"),
])
def test_strict_errors_name_the_key(real, edit, needle):
    _, sd = real
    sd = dict(sd)
    if edit == "drop":
        sd.pop("model.layers.7.mlp.up_proj.weight")
    elif edit == "add":
        sd["model.layers.3.self_attn.q_proj.bias"] = torch.empty(4096, device="meta")
    else:
        sd["model.layers.2.self_attn.k_norm.weight"] = torch.empty(64, device="meta")
    with pytest.raises(WeightError, match=needle):
        load_qwen3(Checkpoint(sd, None, {}, "meta"), device="meta")


def test_truncation_keeps_strictness_for_loaded_layers(real):
    """Dropping unused layers is deliberate, but a defect inside the loaded layers must still be reported."""
    _, sd = real
    sd = dict(sd)
    sd.pop("model.layers.30.mlp.up_proj.weight")  # beyond max_layers: never read, no error
    load_qwen3(Checkpoint(dict(sd), None, {}, "meta"), device="meta", max_layers=27)
    sd.pop("model.layers.26.mlp.up_proj.weight")
    with pytest.raises(WeightError, match=r"layers\.26\.mlp\.up_proj\.weight"):
        load_qwen3(Checkpoint(sd, None, {}, "meta"), device="meta", max_layers=27)
