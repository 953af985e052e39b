"""A LoRA file resolved against one loaded model: native weight key -> the pieces that patch it, plus a report.

`resolve(file, shapes)` is backend-neutral; the torch and MLX appliers (`flux_core/{torch,mlx}/lora.py`) turn the
pieces into merged weights. Checks, before anything is applied (errors name the file and what it was made for):
  * a LoRA for another family or size (klein-4B on 9B, FLUX.1 or Z-Image on klein, ...) -> WeightError;
  * a name that resolves but whose shape does not fit the weight (a different model of the same family) -> WeightError;
  * nothing matched -> WeightError;
  * keys that match nothing -> one warning with counts and examples; text-encoder keys -> said and skipped;
  * a fused and a split entry for the same weight (some Z-Image kohya files have both `attention_qkv` and
    `attention_to_q/k/v`) -> the split set is used once, and the duplicate is reported.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import WeightError
from .formats import LoraFile, PeftAlpha, build_adapters, read_lora
from .names import build_table, guess_lora_target, is_text_encoder, model_identity, strip_prefixes

log = logging.getLogger(__name__)
MAX_LISTED = 8


@dataclass(frozen=True)
class Piece:
    target: str                        # our parameter key
    rows: tuple[int, int] | None       # the row slice patched (None: all rows)
    swap: bool                         # swap the adapter's two row halves onto ours
    adapter: object                    # adapters.LoRA / LoKr / LoHa / Full / DoRA
    source: str                        # the module name in the file (for messages)


@dataclass
class Report:
    path: str
    total: int = 0
    applied: int = 0
    unrecognised: list = field(default_factory=list)
    text_encoder: int = 0
    unsupported: list = field(default_factory=list)
    duplicates: list = field(default_factory=list)

    def message(self) -> str:
        name = Path(self.path).name
        parts = [f"LoRA {name}: applied {self.applied}/{self.total} tensors"]
        if self.unrecognised:
            parts.append(f"{len(self.unrecognised)} not recognised: {_listed(self.unrecognised)}")
        if self.text_encoder:
            parts.append(f"{self.text_encoder} text-encoder tensors skipped (text-encoder LoRAs are not supported; "
                         "the transformer part is applied)")
        if self.unsupported:
            parts.append(f"{len(self.unsupported)} tensors of unsupported adapter types skipped: "
                         f"{_listed(self.unsupported)}")
        if self.duplicates:
            parts.append(f"{len(self.duplicates)} fused entries skipped because the file also has their split "
                         f"q/k/v entries (applied once): {_listed(self.duplicates)}")
        return "; ".join(parts)

    @property
    def clean(self) -> bool:
        return not (self.unrecognised or self.text_encoder or self.unsupported or self.duplicates)


def _listed(items) -> str:
    items = list(items)
    more = f" (and {len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


@dataclass
class ResolvedLora:
    path: str
    pieces: dict                       # our key -> [Piece, ...] in file order
    report: Report
    made_for: str

    @property
    def keys(self):
        return self.pieces.keys()


def resolve(lora, shapes: dict) -> ResolvedLora:
    """`lora`: a path or an already read `LoraFile`; `shapes`: {our parameter key: logical shape} of the model."""
    lf = lora if isinstance(lora, LoraFile) else read_lora(lora)
    family, hidden = model_identity(shapes)
    table = build_table(shapes, family)
    peft = PeftAlpha.from_metadata(lf.metadata)
    report = Report(lf.path, total=lf.n_tensors, unrecognised=list(lf.loose))

    found = []           # (module, short name, target, adapters, bias)
    for mod in lf.modules.values():
        if is_text_encoder(mod.name):
            report.text_encoder += len(mod.keys)
            continue
        short = strip_prefixes(mod.name)
        adapters, unsupported, bias = build_adapters(mod, short, peft)
        if unsupported:
            report.unsupported += mod.keys
            continue
        found.append((mod, short, table.get(short), adapters, bias))

    _check_made_for(lf, found, family, hidden)
    pieces: dict[str, list] = {}     # our key -> [(from a split source, Piece, tensors it stands for)]
    for mod, short, target, adapters, bias in found:
        if target is None:
            report.unrecognised += mod.keys
            continue
        n_keys = len(mod.keys)
        bias_key = target.key.rsplit(".", 1)[0] + ".bias"
        if bias is not None and bias_key not in shapes:   # klein has no biases: a bias delta has nowhere to go
            report.unrecognised += [k for k in mod.keys if k.endswith("diff_b")]
            n_keys -= 1
            bias = None
        report.applied += n_keys
        for adapter in adapters:
            _check_shape(lf, family, hidden, mod.name, target, adapter.shape, shapes)
            pieces.setdefault(target.key, []).append(
                (target.split, Piece(target.key, target.rows, target.swap, adapter, mod.name), n_keys))
            n_keys = 0
        if bias is not None:
            pieces.setdefault(bias_key, []).append(
                (target.split, Piece(bias_key, target.rows, target.swap, bias, mod.name), n_keys))

    out = {key: _dedupe(plist, report) for key, plist in pieces.items()}
    if not out:
        raise WeightError(f"{Path(lf.path).name}: no tensor of this LoRA matches the {family.keys.describe_width(hidden)} "
                          f"model ({report.total} tensors; first keys: {_listed(sorted(lf.modules)[:5])}). "
                          "Is it a LoRA for this model?")
    (log.info if report.clean else log.warning)("fluxcore: %s", report.message())
    return ResolvedLora(lf.path, out, report, family.keys.describe_width(hidden))


def _dedupe(plist: list, report: Report) -> list:
    """Split (q/k/v) pieces win over a fused piece of the same weight; the same region twice is applied once."""
    has_split = any(split for split, _, _ in plist)
    kept, seen = [], set()
    for split, piece, n_keys in plist:
        region = (piece.rows, piece.adapter.kind == "diff")
        if (has_split and not split) or region in seen:
            report.duplicates.append(piece.source)
            report.applied -= n_keys
            continue
        seen.add(region)
        kept.append(piece)
    return kept


def _check_made_for(lf: LoraFile, found: list, family: str, hidden: int) -> None:
    dims = [(short, _in_dim(adapters)) for _, short, _, adapters, _ in found]
    lfam, lhidden, what = guess_lora_target(dims)
    if lfam is None:
        return
    mismatch = lfam is not family or (lhidden is not None and lhidden != hidden)
    if mismatch:
        raise WeightError(f"{Path(lf.path).name} is a LoRA for {what}, but the loaded model is "
                          f"{family.keys.describe_width(hidden)}. Pick a LoRA trained for this model.")


def _in_dim(adapters) -> int | None:
    return adapters[0].shape[1] if adapters else None


def _check_shape(lf, family, hidden, source, target, shape, shapes) -> None:
    full = shapes[target.key]
    want = (target.rows[1] - target.rows[0],) + tuple(full[1:]) if target.rows else tuple(full)
    got = tuple(shape)
    if len(want) == 1 and len(got) == 2 and got[1] == 1:
        got = got[:1]
    if got != want and int(_prod(got)) != int(_prod(want)):
        raise WeightError(f"{Path(lf.path).name}: {source} has shape {list(got)} but the model's "
                          f"{target.key} needs {list(want)}; this LoRA was made for a different model than "
                          f"{family.keys.describe_width(hidden)}. Pick a LoRA trained for this model.")


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
