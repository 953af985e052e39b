"""Reference builders for the Qwen3 text encoder tests: tiny HF models, tokenizers and checkpoint files.

Tiny config from docs/MODELS.md §X: 28 layers so that hs[9], hs[18], hs[27] are un-normed layer outputs as in the real
36-layer model; vocab 261 = 256 byte symbols + 5 chat tokens, so a tiny byte-level tokenizer (no merges) fits it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

TINY = dict(vocab_size=261, hidden_size=32, intermediate_size=64, num_hidden_layers=28, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, rope_theta=1e6, tie_word_embeddings=True, pad_token_id=256)
# Real sizes (Qwen/Qwen3-4B and Qwen/Qwen3-8B config.json).
REAL = {
    "4b": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1e6, tie_word_embeddings=True),
    "8b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1e6,
               tie_word_embeddings=False),
}
TINY_SPECIALS = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258, "<think>": 259, "</think>": 260}

# The generation-prompt part of the Qwen3 chat template for one user message (Qwen/Qwen3-4B tokenizer_config.json):
# `enable_thinking=False` appends an empty think block.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def hf_config(**kw):
    from transformers import Qwen3Config

    cfg = Qwen3Config(**kw)
    cfg._attn_implementation = "sdpa"
    return cfg


def tiny_hf_model(seed: int = 0, **overrides):
    """A Qwen3ForCausalLM with weights large enough that attention is far from uniform and every norm weight matters
    (HF's default init, std 0.02 and unit norms, would hide RoPE / norm-order bugs)."""
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(hf_config(**{**TINY, **overrides})).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return model


def hf_meta_state_dict(size: str) -> dict:
    """Real-size HF Qwen3ForCausalLM state dict (key -> meta tensor), nothing allocated."""
    from transformers import Qwen3ForCausalLM

    with torch.device("meta"):
        model = Qwen3ForCausalLM(hf_config(**REAL[size]))
    return model.state_dict()


def save_tiny_qwen3(tmpdir, layout: str, model) -> Path:
    """Write `model` (a HF Qwen3ForCausalLM) as a checkpoint and return the path to hand to load_qwen3:
      single     one file, Qwen3ForCausalLM keys (`model.` prefix) plus a stray tied `lm_head.weight`
      diffusers  <root>/text_encoder/ written by save_pretrained: config.json + sharded safetensors + index (klein)
      qwen3model <root>/text_encoder/ from the bare Qwen3Model: no `model.` prefix (Z-Image repo); returns the folder
    """
    from safetensors.torch import save_file

    tmpdir = Path(tmpdir)
    if layout == "single":
        sd = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
        path = tmpdir / "qwen_3_tiny.safetensors"
        save_file(sd, str(path))
        return path
    if layout == "diffusers":
        model.save_pretrained(tmpdir / "text_encoder", max_shard_size="200KB")
        return tmpdir
    if layout == "qwen3model":
        model.model.save_pretrained(tmpdir / "text_encoder")
        return tmpdir / "text_encoder"
    raise ValueError(layout)


# ------------------------------------------------------------------------------------------------------ tokenizers
from flux_core.demo import bytes_to_unicode  # noqa: E402  (the GPT-2 byte alphabet, shared with the demo tokenizer)


def tiny_vocab() -> dict[str, int]:
    return {sym: b for b, sym in bytes_to_unicode().items()}


def write_tiny_tokenizer(folder) -> Path:
    """vocab.json (256 byte symbols) + empty merges.txt + added_tokens.json (HF {content: id} format)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tiny_vocab(), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (folder / "added_tokens.json").write_text(json.dumps(TINY_SPECIALS), encoding="utf-8")
    return folder


def tiny_hf_tokenizer():
    """transformers Qwen2Tokenizer over the tiny vocabulary, with the Qwen3 chat template (docs/MODELS.md §Q3, §X)."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab = {**tiny_vocab(), **TINY_SPECIALS}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>")
    tok.add_tokens([AddedToken("<|im_start|>", special=True, normalized=False)], special_tokens=True)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    for t, i in TINY_SPECIALS.items():
        assert tok.convert_tokens_to_ids(t) == i, (t, tok.convert_tokens_to_ids(t), i)
    return tok


def real_hf_tokenizer(folder):
    """transformers Qwen2Tokenizer built from the real vocab.json + merges.txt and the 26 added tokens (whose ids
    must come out as listed: 151643...)."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    folder = Path(folder)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    table = json.loads((folder / "added_tokens.json").read_text(encoding="utf-8"))["added_tokens"]
    for i in sorted(table, key=int):
        e = table[i]
        tok.add_tokens([AddedToken(e["content"], special=e["special"], normalized=False)],
                       special_tokens=e["special"])
        assert tok.convert_tokens_to_ids(e["content"]) == int(i)
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    return tok
