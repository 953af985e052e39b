"""Checkpoint reading: fp8-scaled (ComfyUI) and other odd dtypes load instead of being refused; sharded folders;
clear errors for missing and broken files."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from flux_core.errors import WeightError
from flux_core.weights.io import load_checkpoint
from flux_core.weights.keymap import KeyMap, Rule, check_strict


def _weights():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(8, 4, generator=g), "a.bias": torch.randn(8, generator=g),
            "b.weight": torch.randn(4, 8, generator=g)}


def test_fp8_scaled_is_dequantized(tmp_path):
    sd = _weights()
    scale = sd["a.weight"].abs().max() / 448.0
    q = (sd["a.weight"] / scale).to(torch.float8_e4m3fn)
    f = tmp_path / "fp8.safetensors"
    save_file({"a.weight": q, "a.scale_weight": scale.reshape(1), "a.bias": sd["a.bias"], "b.weight": sd["b.weight"],
               "scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, str(f))
    got = load_checkpoint(f).sd
    assert set(got) == set(sd)  # scale and marker keys consumed
    err = (got["a.weight"].float() - sd["a.weight"]).abs().max() / sd["a.weight"].abs().max()
    assert err < 0.07, err  # e4m3 has a 3-bit mantissa: ~6 % worst-case relative rounding
    assert not torch.equal(got["a.weight"].float(), q.float())  # the scale was applied


@pytest.mark.parametrize("dtype", [torch.float8_e5m2, torch.float64, torch.float16, torch.bfloat16])
def test_any_float_dtype_loads(tmp_path, dtype):
    sd = {k: v.to(dtype) for k, v in _weights().items()}
    f = tmp_path / "w.safetensors"
    save_file(sd, str(f))
    got = load_checkpoint(f).sd
    assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_sharded_folder_with_index_and_config(tmp_path):
    sd = _weights()
    save_file({"a.weight": sd["a.weight"], "a.bias": sd["a.bias"]}, str(tmp_path / "m-00001-of-00002.safetensors"))
    save_file({"b.weight": sd["b.weight"]}, str(tmp_path / "m-00002-of-00002.safetensors"))
    index = {"weight_map": {"a.weight": "m-00001-of-00002.safetensors", "a.bias": "m-00001-of-00002.safetensors",
                            "b.weight": "m-00002-of-00002.safetensors"}}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps({"norm_num_groups": 4}))
    ck = load_checkpoint(tmp_path)
    assert set(ck.sd) == set(sd) and ck.config == {"norm_num_groups": 4}


def test_missing_and_broken_files_say_so(tmp_path):
    with pytest.raises(WeightError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    bad = tmp_path / "truncated.safetensors"
    save_file(_weights(), str(bad))
    bad.write_bytes(bad.read_bytes()[:-20])
    with pytest.raises(WeightError, match="download"):
        load_checkpoint(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightError, match="no .safetensors"):
        load_checkpoint(empty)


def test_keymap_round_trip_and_strict_errors():
    km = KeyMap([Rule("blk.{n}.qkv.weight", ("b.{n}.q.weight", "b.{n}.k.weight", "b.{n}.v.weight"), op="cat"),
                 Rule("out.weight", ("o.weight",), op="swap_halves")])
    g = torch.Generator().manual_seed(1)
    foreign = {"b.0.k.weight": torch.randn(2, 3, generator=g), "b.0.q.weight": torch.randn(2, 3, generator=g),
               "b.0.v.weight": torch.randn(2, 3, generator=g), "o.weight": torch.randn(4, 3, generator=g),
               "same.weight": torch.randn(1, generator=g)}
    native = km.to_native(foreign)
    assert set(native) == {"blk.0.qkv.weight", "out.weight", "same.weight"}
    assert torch.equal(native["blk.0.qkv.weight"][:2], foreign["b.0.q.weight"])  # q first although k sorts first
    assert torch.equal(native["out.weight"][:2], foreign["o.weight"][2:])
    back = km.from_native(native)
    assert set(back) == set(foreign) and all(torch.equal(back[k], foreign[k]) for k in foreign)
    with pytest.raises(WeightError, match="partner"):
        km.to_native({"b.0.q.weight": foreign["b.0.q.weight"]})
    with pytest.raises(WeightError) as e:
        check_strict({"x": (2,), "y": (3,)}, {"x": (4,), "z": (1,)}, "test model")
    msg = str(e.value)
    assert "missing keys (1): y" in msg and "unexpected keys (1): z" in msg and "x file (4,) vs model (2,)" in msg


# ------------------------------------------------------------------ damaged configs, indexes and pickle checkpoints
def _with_config(tmp_path, text):
    f = tmp_path / "m.safetensors"
    save_file(_weights(), str(f), metadata={"config": text})
    return f


@pytest.mark.parametrize("text, logged", [
    ("[1, 2]", "not a JSON object"), ("5", "not a JSON object"), ('{"dim": NaN}', "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"), ("{not json", "not valid JSON"),
])
def test_metadata_config_that_is_not_ours_is_skipped_with_a_warning(tmp_path, caplog, text, logged):
    ck = load_checkpoint(_with_config(tmp_path, text))
    assert ck.config is None and set(ck.sd) == set(_weights())
    assert logged in caplog.text


@pytest.mark.parametrize("config, fragment", [
    ({"num_attention_heads": "24"}, "'num_attention_heads' is \"24\", but it must be a whole number"),
    ({"rope_theta": -1.0}, "'rope_theta' is -1.0, but it must be a number > 0"),
    ({"axes_dims_rope": [32, "x"]}, "'axes_dims_rope'"),
    ({"rope_parameters": {"rope_theta": "big"}}, "(rope_parameters): 'rope_theta'"),
    ({"guidance_embeds": 1}, "true or false"),
    ({"scaling_factor": 0}, "non-zero"),
    ({"dim": 2**40}, "from 1 to"),
])
def test_metadata_config_with_a_wrong_value_names_key_and_file(tmp_path, config, fragment):
    with pytest.raises(WeightError, match="m.safetensors") as e:
        load_checkpoint(_with_config(tmp_path, json.dumps(config)))
    assert fragment in str(e.value) and "re-download" in str(e.value)


@pytest.mark.parametrize("write, fragment", [
    (lambda d: (d / "config.json").write_text('{"in_channels": 64,'), "config.json is not valid JSON"),
    (lambda d: (d / "config.json").write_bytes(b'{"a": "\xff"}'), "not valid JSON"),
    (lambda d: (d / "config.json").write_text("[1]"), "must be a JSON object"),
    (lambda d: (d / "config.json").write_text('{"norm_num_groups": 1.5}'), "'norm_num_groups' is 1.5"),
    (lambda d: (d / "m.safetensors.index.json").write_text('{"metadata": {}}'), "has no 'weight_map'"),
    (lambda d: (d / "m.safetensors.index.json").write_text('{"weight_map": {"a": "../x.safetensors"}}'),
     "not a shard file name"),
    (lambda d: (d / "m.safetensors.index.json").write_text('{"weight_map": '), "not valid JSON"),
])
def test_damaged_diffusers_folder_names_the_file(tmp_path, write, fragment):
    save_file(_weights(), str(tmp_path / "m.safetensors"))
    write(tmp_path)
    with pytest.raises(WeightError, match="re-download") as e:
        load_checkpoint(tmp_path)
    assert fragment in str(e.value)


def test_pickle_checkpoints_are_named_as_such_and_never_unpickled(tmp_path, monkeypatch):
    import pickle

    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    for name in ("model.pt", "model.ckpt", "pytorch_model.bin"):
        torch.save(_weights(), str(tmp_path / name))
        with pytest.raises(WeightError, match="is a pickle checkpoint.*use the .safetensors file"):
            load_checkpoint(tmp_path / name)
    odd = tmp_path / "renamed.safetensors"  # a pickle under a safetensors name: recognised by its bytes
    odd.write_bytes((tmp_path / "model.pt").read_bytes())
    with pytest.raises(WeightError, match="pickle checkpoint"):
        load_checkpoint(odd)
    odd.unlink()
    with pytest.raises(WeightError, match="only pickle checkpoints .*download the .safetensors version"):
        load_checkpoint(tmp_path)


def test_real_library_configs_pass_the_config_check():
    """The configs diffusers and transformers write for every model we read must never be called damaged."""
    import inspect

    import diffusers
    import transformers

    from flux_core.weights.meta import check_config

    for name in ("AutoencoderKLFlux2", "AutoencoderKL", "Flux2Transformer2DModel", "ZImageTransformer2DModel"):
        params = inspect.signature(getattr(diffusers, name).__init__).parameters
        config = {k: p.default for k, p in params.items() if k != "self" and p.default is not inspect.Parameter.empty}
        check_config(json.loads(json.dumps({"_class_name": name, **config}, default=list)), name)
    check_config(json.loads(json.dumps(transformers.Qwen3Config().to_dict())), "Qwen3Config")
