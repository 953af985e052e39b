"""Prompt encoding (flux_core/text.py) vs diffusers' klein and Z-Image prompt encoders, and the tokenizer vs
transformers' Qwen2Tokenizer (tiny vocabulary and the REAL Qwen3 vocabulary vendored in tests/data/qwen-tokenizer).

Embeddings: tolerance 1e-5 relative in float32 (measured ~1e-7 or exactly 0).
"""
import json
from types import SimpleNamespace

import pytest
import torch

from conftest import QWEN_TOKENIZER_DIR, rel_err
from flux_core.errors import ConfigError
from flux_core.text import (KLEIN_LAYERS, KLEIN_TEMPLATE, MAX_LENGTH, ZIMAGE_TEMPLATE, EmbeddingCache, QwenTokenizer,
                            TextEncoder, apply_template, find_tokenizer, layers_needed)
from flux_core.torch.qwen3 import load_qwen3
from refs import qwen3 as R

TOL = 1e-5
PROMPTS = ["a red fox in the snow, 35mm photo", "", "Ünïcödé façade — 日本の猫 😀 {braces} 12345\nnew line\ttab"]
LONG = "a very long prompt about many things " * 20  # 740 bytes -> > 512 tokens with the byte-level tiny vocab
TOKENIZER_STRINGS = PROMPTS + [
    "I'm sure you'll see they've DON'T it's", "  leading and   multiple spaces  ", "\r\nwindows\r\n\r\nlines\n\n\n",
    "e\u0301 vs \u00e9 (NFC)", "3.14159 + 2,718 = 5.86 | 1e-6 ~ 0x1F", "中文分词测试，标点。Русский текст. العربية",
    "emoji 👩‍👩‍👧 🇯🇵 🏳️‍🌈 mixed", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    "text<think>glued</think>text <|endoftext|><|endoftext|>", "code: def f(x):\n    return x**2  # ok",
    KLEIN_TEMPLATE.format(prompt="a cat"), ZIMAGE_TEMPLATE.format(prompt="猫"),
]


@pytest.fixture(autouse=True)
def _one_thread(_deterministic):
    """Tiny 512-token forwards gain nothing from a second thread, and lose a lot when the 2 cores are shared."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def hf_model():
    return R.tiny_hf_model(seed=5)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return R.write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def hf_tok():
    return R.tiny_hf_tokenizer()


@pytest.fixture(scope="module")
def encoder(hf_model, tiny_dir, tmp_path_factory):
    path = R.save_tiny_qwen3(tmp_path_factory.mktemp("te"), "single", hf_model)
    return TextEncoder(load_qwen3(path), QwenTokenizer(tiny_dir), "tiny|fp32", cache=EmbeddingCache(64))


def count_forwards(enc):
    calls = []
    enc.model.register_forward_hook(lambda *a: calls.append(1))
    return calls


# ------------------------------------------------------------------------------------------------------ templates
@pytest.mark.parametrize("prompt", ["a cat", "", "{x} {prompt}\nline"])
def test_templates_equal_the_qwen3_chat_template(hf_tok, prompt):
    msgs = [{"role": "user", "content": prompt}]
    render = lambda thinking: hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                                         enable_thinking=thinking)
    assert apply_template(prompt, "klein") == render(False)
    assert apply_template(prompt, "zimage") == render(True)
    assert apply_template(prompt, "klein").startswith(apply_template(prompt, "zimage"))


# ----------------------------------------------------------------------------------------------------- tokenizers
def test_tiny_tokenizer_matches_transformers(tiny_dir, hf_tok):
    ours = QwenTokenizer(tiny_dir)
    assert ours.pad_id == hf_tok.pad_token_id == 256
    for s in TOKENIZER_STRINGS:
        assert ours.encode(s) == hf_tok(s)["input_ids"], s


@pytest.fixture(scope="module")
def real_hf_tok():
    assert (QWEN_TOKENIZER_DIR / "vocab.json").is_file(), f"the vendored Qwen tokenizer is missing: {QWEN_TOKENIZER_DIR}"
    return R.real_hf_tokenizer(QWEN_TOKENIZER_DIR)


def test_real_tokenizer_matches_transformers(real_hf_tok):
    ours = QwenTokenizer(QWEN_TOKENIZER_DIR)
    assert ours.pad_id == real_hf_tok.pad_token_id == real_hf_tok.convert_tokens_to_ids("<|endoftext|>")
    for s in TOKENIZER_STRINGS + [LONG]:
        assert ours.encode(s) == real_hf_tok(s)["input_ids"], s
    for t in ("<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        assert ours.encode(t) == [real_hf_tok.convert_tokens_to_ids(t)]
    assert ours.decode(ours.encode(PROMPTS[2])) == PROMPTS[2]


def test_real_tokenizer_other_folder_formats(real_hf_tok, tmp_path):
    """ComfyUI's qwen25_tokenizer (tokenizer_config.json added_tokens_decoder), a bare vocab+merges folder (built-in
    Qwen added tokens) and a tokenizer.json all give transformers' ids."""
    table = json.loads((QWEN_TOKENIZER_DIR / "added_tokens.json").read_text())["added_tokens"]
    variants = {
        "comfy": {"tokenizer_config.json": json.dumps({"added_tokens_decoder": table, "pad_token": "<|endoftext|>"})},
        "bare": {},
    }
    for name, extra in variants.items():
        d = tmp_path / name
        d.mkdir()
        for f in ("vocab.json", "merges.txt"):
            (d / f).symlink_to(QWEN_TOKENIZER_DIR / f)
        for f, text in extra.items():
            (d / f).write_text(text)
    (tmp_path / "tj").mkdir()
    real_hf_tok.backend_tokenizer.save(str(tmp_path / "tj" / "tokenizer.json"))
    for name in ("comfy", "bare", "tj"):
        ours = QwenTokenizer(tmp_path / name)
        assert ours.pad_id == 151643
        for s in TOKENIZER_STRINGS:
            assert ours.encode(s) == real_hf_tok(s)["input_ids"], (name, s)


# ---------------------------------------------------------------------------------------------- embeddings parity
def diffusers_klein(hf_model, hf_tok, prompts):
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline

    with torch.no_grad():
        return Flux2KleinPipeline._get_qwen3_prompt_embeds(hf_model, hf_tok, list(prompts), device="cpu",
                                                           max_sequence_length=MAX_LENGTH,
                                                           hidden_states_layers=KLEIN_LAYERS)


def diffusers_zimage(hf_model, hf_tok, prompts):
    from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline

    pipe = SimpleNamespace(tokenizer=hf_tok, text_encoder=hf_model.model)  # Z-Image ships a bare Qwen3Model
    with torch.no_grad():  # _encode_prompt rewrites the list in place: hand it a copy
        return ZImagePipeline._encode_prompt(pipe, list(prompts), device="cpu", max_sequence_length=MAX_LENGTH)


def test_klein_matches_diffusers(encoder, hf_model, hf_tok):
    ours = encoder.encode_klein(PROMPTS + [LONG])
    ref = diffusers_klein(hf_model, hf_tok, PROMPTS + [LONG])
    assert ours.shape == ref.shape == (4, 512, 3 * 32)
    assert rel_err(ours, ref) <= TOL


def test_zimage_matches_diffusers(encoder, hf_model, hf_tok):
    ours = encoder.encode_zimage(PROMPTS + [LONG])
    ref = diffusers_zimage(hf_model, hf_tok, PROMPTS + [LONG])
    assert [o.shape for o in ours] == [r.shape for r in ref]
    assert ours[-1].shape[0] == MAX_LENGTH  # truncated like the pipeline
    assert max(rel_err(o, r) for o, r in zip(ours, ref)) <= TOL


# ----------------------------------------------------------------------------------------------------------- cache
def test_cache_lru_and_release(encoder):
    enc = TextEncoder(encoder.model, encoder.tokenizer, "cache-test", cache=EmbeddingCache(2))
    calls = count_forwards(enc)
    a = enc.encode_klein(["a"])
    a[0, 0, 0] = 1e9  # results are copies: mutating one must not poison the cache
    assert rel_err(enc.encode_klein(["a"]), enc.encode_klein("a")) == 0 and len(calls) == 1
    assert enc.encode_klein(["a"])[0, 0, 0] != 1e9
    enc.encode_zimage(["a"])  # another mode is another entry
    assert len(calls) == 2
    other = TextEncoder(encoder.model, encoder.tokenizer, "other-weights", cache=enc.cache)
    other.encode_klein(["a"])  # same prompt, other source_id: recomputed
    assert len(calls) == 3 and len(enc.cache) == 2  # LRU bound
    enc.encode_klein(["b", "b", "c"])  # misses computed in one batch, duplicates once
    assert len(calls) == 4
    enc.release()
    assert enc.model is None
    enc.encode_klein(["c"])  # still cached
    with pytest.raises(ConfigError, match="released"):
        enc.encode_klein(["never seen"])


# -------------------------------------------------------------------------------------------- layers and loading
def test_layers_needed_follow_the_checkpoint():
    assert layers_needed("klein", 36) == 27 and layers_needed("zimage", 36) == 35 and layers_needed("both", 36) == 35
    assert layers_needed("zimage", 28) == 27


def test_truncated_encoder_reports_missing_layers(hf_model, tiny_dir, tmp_path):
    path = R.save_tiny_qwen3(tmp_path, "single", hf_model)
    enc = TextEncoder(load_qwen3(path, max_layers=20), QwenTokenizer(tiny_dir), "short", cache=EmbeddingCache(2))
    with pytest.raises(ConfigError, match="max_layers >= 27"):
        enc.encode_klein(["x"])


def test_load_text_encoder_diffusers_layout(encoder, hf_model, tmp_path):
    root = R.save_tiny_qwen3(tmp_path, "diffusers", hf_model)
    R.write_tiny_tokenizer(root / "tokenizer")
    from flux_core import models

    enc = models.load_text_encoder(root / "text_encoder", backend="torch", device="cpu", dtype="float32").module
    # only what the two encodings read is loaded: klein's 27 layers are a prefix of Z-Image's num_layers - 1
    assert len(enc.model.layers) == layers_needed("both", enc.num_layers) and enc.model.norm is None
    assert str(root / "text_encoder") in enc.source_id and "float32" in enc.source_id
    # same weights as the `encoder` fixture, whose klein output is checked against diffusers above
    assert rel_err(enc.encode_klein(PROMPTS[:1]), encoder.encode_klein(PROMPTS[:1])) <= 1e-6


def test_tokenizer_model_mismatch_is_reported(encoder, real_hf_tok):
    enc = TextEncoder(encoder.model, QwenTokenizer(QWEN_TOKENIZER_DIR), "mismatch", cache=EmbeddingCache(2))
    with pytest.raises(ConfigError, match="does not belong"):
        enc.encode_klein(["a cat"])


# -------------------------------------------------------------------------------------------------- find_tokenizer
def test_find_tokenizer_search_order(tmp_path, monkeypatch):
    monkeypatch.delenv("FLUXCORE_TOKENIZER", raising=False)
    root = tmp_path / "pipe"
    (root / "text_encoder").mkdir(parents=True)
    weights = root / "text_encoder" / "model.safetensors"
    weights.write_bytes(b"")
    comfy = R.write_tiny_tokenizer(tmp_path / "comfy_qwen25_tokenizer")
    explicit = R.write_tiny_tokenizer(tmp_path / "explicit")
    assert find_tokenizer(explicit, near=[weights], extra_dirs=[comfy]) == explicit
    assert find_tokenizer(explicit / "vocab.json") == explicit  # a file inside the folder is fine too
    with pytest.raises(ConfigError, match="does not exist"):
        find_tokenizer(tmp_path / "nope", near=[weights], extra_dirs=[comfy])  # explicit never falls back
    assert find_tokenizer(near=[weights], extra_dirs=[comfy]) == comfy
    R.write_tiny_tokenizer(root / "tokenizer")
    assert find_tokenizer(near=[weights], extra_dirs=[comfy]) == root / "tokenizer"  # diffusers layout wins
    assert find_tokenizer(near=[root / "text_encoder"]) == root / "tokenizer"
    env_dir = R.write_tiny_tokenizer(tmp_path / "env")
    monkeypatch.setenv("FLUXCORE_TOKENIZER", str(env_dir))
    assert find_tokenizer(near=[tmp_path / "elsewhere" / "w.safetensors"]) == env_dir


def test_find_tokenizer_error_lists_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUXCORE_TOKENIZER", str(tmp_path / "env_missing"))
    weights = tmp_path / "models" / "text_encoders" / "qwen_3_4b.safetensors"
    with pytest.raises(ConfigError) as e:
        find_tokenizer(near=[weights], extra_dirs=[tmp_path / "comfy_tok"])
    msg = str(e.value)
    for place in (weights.parent / "tokenizer", weights.parent.parent / "tokenizer", weights.parent,
                  tmp_path / "comfy_tok", tmp_path / "env_missing"):
        assert str(place) in msg
    assert "--tokenizer PATH" in msg and "FLUXCORE_TOKENIZER" in msg


@pytest.mark.slow
def test_load_text_encoder_compile_is_the_same_function(encoder, hf_model, tmp_path):
    """compile=True compiles each Qwen3 layer (torch.compile; on CUDA under the CUDA-graph replay) and is a separate
    cache entry; on the CPU the compiled layers give the plain encoder's embeddings to float32 round-off."""
    root = R.save_tiny_qwen3(tmp_path, "diffusers", hf_model)
    R.write_tiny_tokenizer(root / "tokenizer")
    from flux_core import models

    kw = dict(backend="torch", device="cpu", dtype="float32")
    plain = models.load_text_encoder(root / "text_encoder", **kw)
    fast = models.load_text_encoder(root / "text_encoder", compile=True, **kw)
    assert fast is not plain and any("torch.compile on" in n and "Qwen3 layers" in n for n in fast.notes)
    layers = fast.module.model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert all(layer._compiled_call_impl is None for layer in plain.module.model.layers)
    from flux_core.text import clear_embedding_cache

    want = plain.module.encode_klein(PROMPTS[:1])
    clear_embedding_cache()  # both share a source id: without this the second encode is a cache hit
    calls = count_forwards(fast.module)
    assert rel_err(fast.module.encode_klein(PROMPTS[:1]), want) <= 1e-5 and calls
    enc = plain.module.model.use_cuda_graphs()
    old = enc.graphed
    from flux_core.torch.loaders import compile_text_encoder

    compile_text_encoder(enc)  # compiled after graphs were set up: a fresh cache (old captures hold old kernels)
    assert enc.graphed is not old
