"""Several LoRAs with strengths merged into a loaded model, changeable without re-reading the base checkpoint.

A backend applier (`flux_core/torch/lora.py`, `flux_core/mlx/lora.py`) knows how to read, back up, restore and write
one weight; this module holds the backend-neutral bookkeeping:
  * the original value of every weight a LoRA touched is kept (like ComfyUI's ModelPatcher backups) and is the
    starting point of every re-merge, so weights never drift however often strengths change, and removing the
    last LoRA restores the file's values bit for bit;
  * each weight remembers which (piece, strength) list produced it: changing one LoRA's strength re-merges only the
    weights that LoRA touches;
  * a merge is W = original (float32) patched by every piece in LoRA order, rounded ONCE to the stored dtype
    (or re-quantized once from the original quantized weight: see docs/LORA.md "Quantized models").
Memory: the backups are the size of the touched weights in their stored dtype (quantized weights: their packed
size), freed as soon as no LoRA touches them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .adapters import apply


@dataclass
class LoraState:
    backups: dict = field(default_factory=dict)      # our key -> backend snapshot of the original weight
    signatures: dict = field(default_factory=dict)   # our key -> ((id(piece), strength), ...) merged now
    loras: list = field(default_factory=list)        # [(ResolvedLora, strength)] applied now (keeps ids alive)

    def backup_bytes(self, applier) -> int:
        return sum(applier.nbytes(b) for b in self.backups.values())


def swap_halves(xp, t):
    h = t.shape[0] // 2
    return xp.cat([t[h:], t[:h]])


def patched(xp, w, entries):
    """float32 weight `w` with every (Piece, strength) applied in order."""
    for piece, strength in entries:
        lo, hi = piece.rows if piece.rows else (0, w.shape[0])
        region = w[lo:hi] if piece.rows else w
        if piece.swap:
            region = swap_halves(xp, region)
        new = apply(xp, region, piece.adapter, strength)
        if piece.swap:
            new = swap_halves(xp, new)
        w = xp.cat([w[:lo], new, w[hi:]]) if piece.rows else new
    return w


def set_loras(applier, state: LoraState, loras: list) -> int:
    """Make the model hold exactly `loras` ([(ResolvedLora, strength)], in order). Returns how many weights changed."""
    want: dict[str, list] = {}
    for resolved, strength in loras:
        for key, plist in resolved.pieces.items():
            want.setdefault(key, []).extend((p, float(strength)) for p in plist)
    signatures = {k: tuple((id(p), s) for p, s in v) for k, v in want.items()}
    changed = 0
    for key in list(state.signatures) + [k for k in want if k not in state.signatures]:
        if state.signatures.get(key) == signatures.get(key):
            continue
        if not changed:
            applier.begin()   # e.g. park an offloaded model on its host masters: only when a weight changes
        changed += 1
        if key not in want:
            applier.restore(key, state.backups.pop(key))
            continue
        if key not in state.backups:
            state.backups[key] = applier.snapshot(key)
        applier.write(key, patched(applier.xp, applier.original(key, state.backups[key]), want[key]))
    if changed:
        applier.sync()
    state.signatures, state.loras = signatures, list(loras)
    return changed
