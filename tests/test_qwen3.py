"""Qwen3 text encoder (flux_core/torch/qwen3.py) vs transformers Qwen3ForCausalLM at the tiny 28-layer config.

Tolerance 1e-5 relative (float32; the two implementations share no code, measured ~0 because the op order is the same).
"""
import json

import pytest
import torch

from conftest import rel_err
from flux_core.errors import ConfigError, WeightError
from flux_core.torch.qwen3 import Qwen3Config, Qwen3Encoder, load_qwen3, make_mask
from flux_core.weights.io import load_checkpoint
from refs import qwen3 as R

TOL = 1e-5
LAYOUTS = ("single", "diffusers", "qwen3model")


@pytest.fixture(autouse=True)
def _one_thread(_deterministic):
    """Tiny forwards gain nothing from a second thread, and lose a lot when the 2 cores are shared."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def hf_model():
    return R.tiny_hf_model()


@pytest.fixture(scope="module")
def files(hf_model, tmp_path_factory):
    return {lay: R.save_tiny_qwen3(tmp_path_factory.mktemp(lay), lay, hf_model) for lay in LAYOUTS}


@pytest.fixture(scope="module")
def batch():
    """Right padding (klein / Z-Image), left padding (rows that see no key at all), and no padding."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 261, (3, 24), generator=g)
    mask = torch.ones(3, 24, dtype=torch.long)
    mask[0, 17:] = 0
    mask[1, :5] = 0
    ids[mask == 0] = 256
    return ids, mask


def hf_hidden(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states


@pytest.mark.parametrize("layout", LAYOUTS)
def test_hidden_states_match_hf_with_padding(hf_model, files, batch, layout):
    enc = load_qwen3(files[layout])
    assert enc.config.num_layers == 28 and enc.norm is not None
    ids, mask = batch
    ref = hf_hidden(hf_model, ids, mask)
    with torch.no_grad():
        ours = enc(ids, mask, output_layers=tuple(range(29)))
    assert len(ref) == len(ours) == 29
    errs = [rel_err(a, b) for a, b in zip(ours, ref)]
    assert not any(torch.isnan(h).any() for h in ours)
    assert max(errs) <= TOL, errs


def test_pad_rows_attend_real_tokens_not_themselves():
    m = make_mask(torch.tensor([[1, 1, 1, 0, 0]]), 5, "cpu")
    assert m.dead is None
    assert m.keep[0, 0, 4].tolist() == [True, True, True, False, False]  # pad query: real keys only
    assert m.keep[0, 0, 1].tolist() == [True, True, False, False, False]  # causal
    assert make_mask(torch.ones(2, 5, dtype=torch.long), 5, "cpu").keep is None  # no padding: fused causal SDPA


def test_output_layer_order_and_negative_indices(hf_model, files, batch):
    enc = load_qwen3(files["single"])
    ids, mask = batch
    ref = hf_hidden(hf_model, ids, mask)
    with torch.no_grad():
        out = enc(ids, mask, output_layers=(27, -1, 0, -2, 9))
    for got, k in zip(out, (27, -1, 0, -2, 9)):
        assert rel_err(got, ref[k]) <= TOL
    with pytest.raises(ConfigError, match="out of range"):
        enc(ids, mask, output_layers=(29,))


def test_truncated_model_never_builds_or_runs_unused_layers(hf_model, files, batch):
    enc = load_qwen3(files["diffusers"], max_layers=27)
    assert len(enc.layers) == 27 and enc.norm is None
    assert not any(k.startswith(("layers.27.", "norm.")) for k in enc.state_dict())
    assert enc.config.num_layers == 28  # indices still refer to the full checkpoint
    ran = []
    for i, layer in enumerate(enc.layers):
        layer.register_forward_hook(lambda *a, i=i: ran.append(i))
    ids, mask = batch
    ref = hf_hidden(hf_model, ids, mask)
    with torch.no_grad():
        out = enc(ids, mask, output_layers=(9, 18))
    assert ran == list(range(18))  # stops after the deepest requested layer
    assert max(rel_err(a, ref[k]) for a, k in zip(out, (9, 18))) <= TOL
    with torch.no_grad():
        (h27,) = enc(ids, mask, output_layers=(27,))
    assert rel_err(h27, ref[27]) <= TOL
    for bad in ((-1,), (28,)):
        with pytest.raises(ConfigError, match="max_layers"):
            enc(ids, mask, output_layers=bad)


def test_config_detection_and_rope_theta_from_config_json(tmp_path, batch):
    # theta 1e4 (the transformers 5 default) written by save_pretrained as rope_parameters.rope_theta: our loader
    # must pick it up from config.json, or every hidden state after layer 0 differs.
    hf = R.tiny_hf_model(seed=3, rope_theta=1e4, num_hidden_layers=4, rms_norm_eps=1e-5)
    hf.save_pretrained(tmp_path / "text_encoder")
    saved = json.loads((tmp_path / "text_encoder" / "config.json").read_text())
    assert "rope_theta" in saved or "rope_theta" in (saved.get("rope_parameters") or {})
    enc = load_qwen3(tmp_path)
    assert (enc.config.rope_theta, enc.config.rms_norm_eps, enc.config.num_layers) == (1e4, 1e-5, 4)
    ids, mask = batch
    with torch.no_grad():
        out = enc(ids, mask, output_layers=(4,))[0]
    assert rel_err(out, hf_hidden(hf, ids, mask)[4]) <= TOL


def test_config_json_fields():
    sd = {k: torch.empty(s, device="meta") for k, s in {
        "embed_tokens.weight": (261, 32), "layers.0.self_attn.q_norm.weight": (16,),
        "layers.0.self_attn.q_proj.weight": (32, 32), "layers.0.self_attn.k_proj.weight": (16, 32),
        "layers.0.mlp.gate_proj.weight": (64, 32)}.items()}
    assert Qwen3Config.from_state_dict(sd).rope_theta == 1e6  # no config.json: Qwen3's theta, not HF's 1e4 default
    assert Qwen3Config.from_state_dict(sd, {"rope_theta": 5e5, "rms_norm_eps": 1e-5}).rope_theta == 5e5
    with pytest.raises(WeightError, match="num_hidden_layers"):
        Qwen3Config.from_state_dict(sd, {"num_hidden_layers": 36})
    with pytest.raises(ConfigError, match="yarn"):
        Qwen3Config.from_state_dict(sd, {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_strict_errors_name_the_key(files):
    ckpt = load_checkpoint(files["single"])
    ckpt.sd.pop("model.layers.4.mlp.up_proj.weight")
    with pytest.raises(WeightError, match=r"layers\.4\.mlp\.up_proj\.weight"):
        load_qwen3(ckpt)
    ckpt = load_checkpoint(files["single"])
    for k in [k for k in ckpt.sd if k.startswith("model.layers.5.")]:
        ckpt.sd.pop(k)
    with pytest.raises(WeightError, match=r"layers \[5\] are missing"):
        load_qwen3(ckpt)


def test_bfloat16_load(hf_model, files, batch):
    enc = load_qwen3(files["single"], dtype=torch.bfloat16)
    assert {p.dtype for p in enc.parameters()} == {torch.bfloat16}
    ids, mask = batch
    with torch.no_grad():
        (h,) = enc(ids, mask, output_layers=(9,))
    assert h.dtype == torch.bfloat16
    # bf16 through 9 layers: a few % is rounding; a dtype bug (e.g. norm in bf16 statistics) is far worse
    assert rel_err(h.float(), hf_hidden(hf_model, ids, mask)[9]) < 5e-2


def test_meta_build_allocates_nothing():
    with torch.device("meta"):
        m = Qwen3Encoder(Qwen3Config(), max_layers=27)
    assert all(p.is_meta for p in m.parameters())
    assert len(m.layers) == 27 and m.norm is None


def test_qwen3_vl_layout_loads_the_text_model(tmp_path):
    """Qwen3-VL checkpoints nest the text model under `model.language_model.` beside a vision tower (`model.visual.`);
    the text part must load as the same encoder and the vision keys be ignored."""
    from safetensors.torch import save_file

    hf = R.tiny_hf_model(seed=3)
    sd = {k.replace("model.", "model.language_model.", 1): v.contiguous() for k, v in hf.state_dict().items()
          if k.startswith("model.")}
    sd["model.visual.patch_embed.proj.weight"] = torch.randn(4, 3, 2, 2)
    path = tmp_path / "qwen3_vl_like.safetensors"
    save_file(sd, str(path))
    ours = load_qwen3(path, max_layers=27)
    ids = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        want = hf(input_ids=ids, output_hidden_states=True).hidden_states[27]
        got = ours(ids, None, output_layers=(27,))[0]
    assert rel_err(got, want) <= 1e-5
