"""Prompt -> text embeddings for FLUX.2 [klein] and Z-Image, with the Qwen3 encoder (flux_core/torch/qwen3.py).

Matches diffusers `Flux2KleinPipeline._get_qwen3_prompt_embeds` and `ZImagePipeline._encode_prompt` (float32 ~1e-6,
tests/test_text.py). docs/MODELS.md §Q1-§Q5.

  klein:   KLEIN_TEMPLATE (an empty think block: enable_thinking=False), right-padded with <|endoftext|> to 512
           tokens, truncated to 512, causal + padding mask, concat(hs[9], hs[18], hs[27]) per token -> [B, 512, 3H].
           All 512 rows are kept: the DiT sees the pad rows (they attend the real tokens).
  Z-Image: ZIMAGE_TEMPLATE (no think block), hs[num_layers - 1] (= HF hidden_states[-2], un-normed), real tokens
           only -> [L, H]. Causal attention makes the real rows independent of any right padding, so it may run
           unpadded.
  both:    what a loaded encoder builds: layers up to num_layers - 1 serve either mode, so one encoder file serves
           klein and Z-Image (the last layer and the final norm are never loaded).

We format the templates ourselves and never use a tokenizer folder's chat template (ComfyUI's bundled one is
Qwen2.5's and injects a default system prompt).
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence

from .errors import ConfigError

log = logging.getLogger(__name__)

KLEIN_TEMPLATE = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
ZIMAGE_TEMPLATE = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
TEMPLATES = {"klein": KLEIN_TEMPLATE, "zimage": ZIMAGE_TEMPLATE}
MAX_LENGTH = 512                 # klein pads to it; both pipelines truncate to it
KLEIN_LAYERS = (9, 18, 27)       # fixed HF hidden_states indices (BFL OUTPUT_LAYERS_QWEN3), for 4B and 8B alike
MODES = ("klein", "zimage", "both")

# Qwen2/Qwen3 pre-tokenizer: contractions, letters, single digits, punctuation runs, newlines, spaces.
QWEN_PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# The added tokens of the Qwen2.5/Qwen3 vocabulary (ids 151643...), used only when a folder holds vocab.json +
# merges.txt and describes no added tokens at all.
_QWEN_ADDED = ("<|endoftext|> <|im_start|> <|im_end|> <|object_ref_start|> <|object_ref_end|> <|box_start|> "
               "<|box_end|> <|quad_start|> <|quad_end|> <|vision_start|> <|vision_end|> <|vision_pad|> <|image_pad|> "
               "<|video_pad|> <tool_call> </tool_call> <|fim_prefix|> <|fim_middle|> <|fim_suffix|> <|fim_pad|> "
               "<|repo_name|> <|file_sep|> <tool_response> </tool_response> <think> </think>").split()
_QWEN_BASE_VOCAB = 151643
_REQUIRED = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")  # what our templates use


def apply_template(prompt: str, mode: str) -> str:
    if mode not in TEMPLATES:
        raise ConfigError(f"unknown text mode {mode!r} (klein | zimage)")
    return TEMPLATES[mode].format(prompt=prompt)


def output_layers(mode: str, num_layers: int) -> tuple[int, ...]:
    """HF hidden_states indices a mode reads, from the CHECKPOINT's layer count."""
    if mode == "klein":
        return KLEIN_LAYERS
    if mode == "zimage":
        return (num_layers - 1,)
    if mode == "both":
        return KLEIN_LAYERS + (num_layers - 1,)
    raise ConfigError(f"unknown text mode {mode!r} ({' | '.join(MODES)})")


# hidden width -> (model, decoder layers, the file users download); a file with fewer layers lost its end
QWEN3_DEPTHS = {2560: ("Qwen3-4B", 36, "qwen_3_4b.safetensors"), 4096: ("Qwen3-8B", 36, "a Qwen3-8B text encoder")}


def check_depth(num_layers: int, hidden_size: int, source) -> None:
    """Refuse, at load time and naming the file, a Qwen3 checkpoint that lacks its last decoder layers (a cut-off
    download or export): klein reads layer 27 and Z-Image layer num_layers - 1, so it cannot give the right features."""
    name = Path(str(source)).name
    known = QWEN3_DEPTHS.get(hidden_size)
    if known and num_layers != known[1]:
        raise ConfigError(f"text encoder {name} has {num_layers} decoder layers, but {known[0]} has {known[1]}: the "
                          f"file is missing its last layers (a cut-off download or export). Re-download {known[2]}.")
    if num_layers < KLEIN_LAYERS[-1]:
        raise ConfigError(f"text encoder {name} has {num_layers} decoder layers, but FLUX.2 klein reads layer "
                          f"{KLEIN_LAYERS[-1]} (Qwen3-4B and -8B have 36): the file is missing its last layers or is "
                          "another model. Re-download qwen_3_4b.safetensors (klein 4B, Z-Image) or a Qwen3-8B text "
                          "encoder (klein 9B).")


def layers_needed(mode: str, num_layers: int) -> int:
    """How many decoder layers must be built/loaded for a mode: klein 27, Z-Image num_layers-1 (35 for Qwen3-4B)."""
    return max(output_layers(mode, num_layers))


# -------------------------------------------------------------------------------------------------------- tokenizer
class QwenTokenizer:
    """Qwen byte-level BPE built with the `tokenizers` library; matches transformers' Qwen2Tokenizer.

    From a folder with `tokenizer.json`, or `vocab.json` + `merges.txt` (+ added tokens from `tokenizer_config.json`
    `added_tokens_decoder` and/or `added_tokens.json`). Added tokens such as <|im_start|> and <think> are split out
    before BPE, never normalised, so they always encode to one id."""

    def __init__(self, folder: str | os.PathLike):
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        cfg = _read_json(self.folder / "tokenizer_config.json") or {}
        if (self.folder / "tokenizer.json").is_file():
            try:
                self._tok = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
            except Exception as e:  # the tokenizers library raises a bare Exception for a damaged file
                raise _damaged(self.folder / "tokenizer.json", e) from None
        elif (self.folder / "vocab.json").is_file() and (self.folder / "merges.txt").is_file():
            self._tok = _build_bpe(self.folder, cfg)
        else:
            raise ConfigError(f"{self.folder} is not a tokenizer folder: it needs tokenizer.json, or vocab.json and "
                              "merges.txt (the Qwen tokenizer files)")
        missing = [t for t in _REQUIRED if self._tok.token_to_id(t) is None]
        if missing:
            raise ConfigError(f"tokenizer in {self.folder} lacks the Qwen chat tokens {missing}; is it a Qwen2.5/Qwen3 "
                              "tokenizer?")
        pad = cfg.get("pad_token") or (_read_json(self.folder / "added_tokens.json") or {}).get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        if pad is not None and not isinstance(pad, str):
            raise _damaged(self.folder / "tokenizer_config.json", f"pad_token is {pad!r}, not a string")
        self.pad_id = self._tok.token_to_id(pad or "<|endoftext|>")
        if self.pad_id is None:
            raise ConfigError(f"tokenizer in {self.folder}: pad token {pad!r} is not in the vocabulary")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


def _build_bpe(folder: Path, cfg: dict):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    vocab = _read_json(folder / "vocab.json")  # ours first, so a damaged vocab is named apart from merges.txt
    if not all(isinstance(i, int) for i in vocab.values()):
        raise _damaged(folder / "vocab.json", "token ids must be whole numbers")
    try:
        vocab, merges = BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
    except Exception as e:  # the tokenizers library raises a bare Exception
        raise _damaged(folder / "merges.txt", e) from None
    added = _added_tokens(folder, cfg)
    if not added and len(vocab) == _QWEN_BASE_VOCAB:
        added = {t: (_QWEN_BASE_VOCAB + i, t.startswith("<|")) for i, t in enumerate(_QWEN_ADDED)}
    for content, (i, _special) in added.items():
        vocab.setdefault(content, i)  # put them in the model vocab first, so add_tokens keeps these exact ids
    try:  # a merge of tokens that are not in vocab.json fails here
        tok = Tokenizer(BPE(vocab, merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                            end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    except Exception as e:
        raise _damaged(folder / "merges.txt", e) from None
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    for content, (i, special) in sorted(added.items(), key=lambda kv: kv[1][0]):
        token = AddedToken(content, special=special, normalized=False)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
        if tok.token_to_id(content) != i:
            raise ConfigError(f"tokenizer in {folder}: added token {content!r} should have id {i}, "
                              f"got {tok.token_to_id(content)} (vocab.json and the added tokens disagree)")
    return tok


def _added_tokens(folder: Path, cfg: dict) -> dict[str, tuple[int, bool]]:
    """content -> (id, special) from tokenizer_config.json and added_tokens.json (both formats seen in the wild:
    the HF `{content: id}` map and a `{"added_tokens": {id: {content, special}}}` table)."""
    out = {}
    try:
        for i, e in (cfg.get("added_tokens_decoder") or {}).items():
            out[e["content"]] = (int(i), bool(e.get("special", True)))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise _damaged(folder / "tokenizer_config.json", f"added_tokens_decoder: {e!r}") from None
    data = _read_json(folder / "added_tokens.json") or {}
    try:
        if isinstance(data.get("added_tokens"), dict):
            for i, e in data["added_tokens"].items():
                out.setdefault(e["content"], (int(i), bool(e.get("special", True))))
        else:
            for content, i in data.items():
                if isinstance(i, int):
                    out.setdefault(content, (i, content.startswith("<|")))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise _damaged(folder / "added_tokens.json", repr(e)) from None
    return out


def _read_json(path: Path):
    """A tokenizer JSON file as a dict (None when absent); anything else is a ConfigError naming the file."""
    from .errors import WeightError
    from .weights.meta import read_json

    if not path.is_file():
        return None
    try:
        data = read_json(path, "tokenizer file")
    except WeightError as e:  # it names the file and the fix already
        raise ConfigError(str(e)) from None
    if not isinstance(data, dict):
        raise _damaged(path, f"a JSON {type(data).__name__}, not an object")
    return data


def _damaged(path: Path, why) -> ConfigError:
    return ConfigError(f"tokenizer file {path} is damaged ({why}); re-download the tokenizer folder (or point "
                       "--tokenizer / the loader's tokenizer input at a good one)")


def is_tokenizer_dir(p: Path) -> bool:
    return p.is_dir() and ((p / "tokenizer.json").is_file() or
                           ((p / "vocab.json").is_file() and (p / "merges.txt").is_file()))


def find_tokenizer(explicit: str | os.PathLike | None = None, near: Iterable = (), extra_dirs: Iterable = ()) -> Path:
    """Locate the Qwen tokenizer folder. Order: `explicit` (must be valid: it wins, no silent fallback); for each
    weights path in `near`: a `tokenizer/` folder beside it, then one above it (diffusers: <root>/tokenizer next to
    <root>/text_encoder), then the weights' own folder; `extra_dirs` (e.g. ComfyUI's comfy/text_encoders/
    qwen25_tokenizer); then env FLUXCORE_TOKENIZER."""
    if explicit:
        p = Path(explicit).expanduser()
        p = p.parent if p.is_file() else p
        if is_tokenizer_dir(p):
            return p
        raise ConfigError(f"tokenizer folder {explicit} does not exist or holds neither tokenizer.json nor "
                          "vocab.json + merges.txt")
    looked = []
    for n in ([near] if isinstance(near, (str, os.PathLike)) else near):
        n = Path(n).expanduser()
        d = n if n.is_dir() else n.parent
        looked += [d / "tokenizer", d.parent / "tokenizer", d]
    looked += [Path(d).expanduser() for d in extra_dirs]
    env = os.environ.get("FLUXCORE_TOKENIZER")
    if env:
        looked.append(Path(env).expanduser())
    for p in looked:
        if is_tokenizer_dir(p):
            log.debug("Qwen tokenizer found at %s", p)
            return p
    places = "\n".join(f"  - {p}" for p in looked) or "  (nowhere: no weights path, no extra folders given)"
    raise ConfigError(
        "could not find the Qwen3 tokenizer (a folder with tokenizer.json, or vocab.json + merges.txt). Looked in:\n"
        f"{places}\n  - env FLUXCORE_TOKENIZER ({'set to ' + env if env else 'not set'})\n"
        "Fix: pass --tokenizer PATH (or the loader's tokenizer input), set FLUXCORE_TOKENIZER=PATH, or put the "
        "`tokenizer/` folder of a diffusers FLUX.2-klein / Z-Image repo next to the text encoder weights.")


# ----------------------------------------------------------------------------------------------------- text encoder
class EmbeddingCache:
    """LRU of encoded prompts keyed by (prompt, mode, source_id). Holds tensors on the encoder's device."""

    def __init__(self, max_items: int = 16):
        self.max_items = max_items
        self._d: OrderedDict = OrderedDict()

    def get(self, key):
        if key in self._d:
            self._d.move_to_end(key)
            return self._d[key]
        return None

    def put(self, key, value) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.max_items:
            self._d.popitem(last=False)

    def clear(self) -> None:
        self._d.clear()

    def __len__(self):
        return len(self._d)


_SHARED_CACHE = EmbeddingCache()


def clear_embedding_cache() -> None:
    """Drop every cached prompt embedding of the shared cache (they live on the encoder's device)."""
    _SHARED_CACHE.clear()


class TextEncoder:
    """Qwen3 encoder + tokenizer -> klein / Z-Image prompt embeddings, cached per (prompt, mode, source_id).

    `source_id` names the weights and dtype (e.g. "qwen_3_4b.safetensors|bf16"); encoders sharing a cache must give
    different ids for different weights."""

    def __init__(self, model, tokenizer: QwenTokenizer, source_id: str, cache: EmbeddingCache | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.source_id = source_id
        self.num_layers = model.config.num_layers  # of the CHECKPOINT, even if fewer layers were loaded
        self.vocab_size = model.config.vocab_size
        self.cache = _SHARED_CACHE if cache is None else cache

    def token_ids(self, prompt: str, mode: str) -> list[int]:
        """Template, tokenize, truncate to MAX_LENGTH (as the pipelines' `truncation=True`)."""
        ids = self.tokenizer.encode(apply_template(prompt, mode))[:MAX_LENGTH]
        if ids and max(ids) >= self.vocab_size:
            raise ConfigError(f"token id {max(ids)} >= the text encoder's vocabulary ({self.vocab_size}): the "
                              "tokenizer does not belong to this Qwen3 checkpoint")
        return ids

    def encode(self, prompts: Sequence[str] | str, mode: str):
        """Prompts -> the embeddings of one encoding mode ('klein' | 'zimage'; see the module docstring)."""
        encoders = {"klein": self.encode_klein, "zimage": self.encode_zimage}
        if mode not in encoders:
            raise ConfigError(f"unknown text mode {mode!r}: one of {', '.join(encoders)}")
        return encoders[mode](prompts)

    def encode_klein(self, prompts: Sequence[str] | str):
        """-> [B, 512, 3H] (hs 9, 18, 27 concatenated per token, pad rows included)."""
        import torch

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        got = {p: self._cached(p, "klein") for p in prompts}  # local: a small cache may evict during the batch
        todo = [p for p, v in got.items() if v is None]
        if todo:
            hs = self._forward([self.token_ids(p, "klein") for p in todo], KLEIN_LAYERS, pad_to=MAX_LENGTH)
            emb = torch.cat(hs, dim=-1)                                                      # [b, 512, 3H]
            for p, row in zip(todo, emb):
                got[p] = row
                self.cache.put((p, "klein", self.source_id), row)
        return torch.stack([got[p] for p in prompts])

    def encode_zimage(self, prompts: Sequence[str] | str) -> list:
        """-> list of [L_i, H] (hidden_states[-2] of the real tokens only)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        got = {p: self._cached(p, "zimage") for p in prompts}
        todo = [p for p, v in got.items() if v is None]
        if todo:
            ids = [self.token_ids(p, "zimage") for p in todo]
            (hs,) = self._forward(ids, (self.num_layers - 1,), pad_to=None)  # [b, longest, H]
            for p, row, n in zip(todo, hs, map(len, ids)):
                got[p] = row[:n].clone()  # own storage: a cached view would pin the whole padded batch
                self.cache.put((p, "zimage", self.source_id), got[p])
        return [got[p].clone() for p in prompts]

    def release(self) -> None:
        """Drop the model (memory). Cached prompts stay servable; anything else needs a new TextEncoder."""
        self.model = None

    # ------------------------------------------------------------------------------------------------- internals
    def _cached(self, prompt: str, mode: str):
        return self.cache.get((prompt, mode, self.source_id))

    def _forward(self, ids: list[list[int]], layers: tuple[int, ...], pad_to: int | None) -> list:
        """Right-pad with the tokenizer's pad id (to `pad_to`, or the longest in the batch), mask, run."""
        import torch

        if self.model is None:
            raise ConfigError("this text encoder was released; load it again to encode new prompts")
        width = pad_to or max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for b, x in enumerate(ids):
            input_ids[b, :len(x)] = torch.tensor(x, dtype=torch.long)
            mask[b, :len(x)] = 1
        return self.model.hidden_states(input_ids, mask, output_layers=layers)  # either backend's Qwen3Encoder
