"""The adapter types a LoRA file can carry, and the one function that applies a piece of one to a weight region.

Every adapter turns its tensors into a float32 ΔW of its *own* module's shape [out, in] (the split `to_q`, the norm_out
Linear in diffusers row order, ...); `resolve.py` decides where that region lives in our fused native weight.
The math runs through `xp`, a tiny backend object (torch: `flux_core/torch/lora.py`, MLX: `flux_core/mlx/lora.py`)
that offers `array(t)` (a host tensor -> float32 on the compute device), `cat(list)` and `rownorm`/`colnorm`;
everything else is `@`, `*`, slicing and `reshape`, which torch and MLX spell the same. So both backends run the
same formula op for op, and agree to float32 rounding.

Scales (what each file format means, docs/LORA.md "Alpha"):
  LoRA   ΔW = (α / r) · B @ A, r = A.shape[0] of this very module; no α -> scale 1
  LoKr   ΔW = scale · kron(w1, w2); scale = α / dim only when w1 or w2 is factorised, else 1 (α ignored: ai-toolkit's
         full-rank files store α ≈ 1e10, inf in fp16)
  LoHa   ΔW = (α / w1_b.shape[0]) · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)
  diff   ΔW = the stored tensor
DoRA (an optional magnitude on a LoRA) depends on the weight it lands on, so `apply` gets the current region.
"""
from __future__ import annotations

from dataclasses import dataclass


def _rows(t) -> int:
    return int(t.shape[0])


def _cols(t) -> int:
    n = 1
    for d in t.shape[1:]:
        n *= int(d)
    return n


def as2d(xp, t):
    """A stored tensor -> float32 2-D array on the compute device (1x1 conv LoRAs are [r, in, 1, 1])."""
    a = xp.array(t)
    return a.reshape(a.shape[0], -1) if len(a.shape) != 2 else a


def kron(a, b):
    """kron(a, b) for 2-D arrays by broadcasting (torch and MLX alike): row i*p+k, column j*q+l = a[i,j]·b[k,l]."""
    p, q = b.shape
    return (a[:, None, :, None] * b[None, :, None, :]).reshape(a.shape[0] * p, a.shape[1] * q)


@dataclass
class LoRA:
    up: object                # B [out, r]
    down: object              # A [r, in]
    scale: float

    kind = "lora"

    @property
    def shape(self):
        return (_rows(self.up), _cols(self.down))

    def delta(self, xp):
        return (as2d(xp, self.up) @ as2d(xp, self.down)) * self.scale


@dataclass
class LoKr:
    w1: object | None
    w1_ab: tuple | None
    w2: object | None
    w2_ab: tuple | None
    scale: float

    kind = "lokr"

    @staticmethod
    def _factor(xp, full, ab):
        return as2d(xp, full) if full is not None else as2d(xp, ab[0]) @ as2d(xp, ab[1])

    @staticmethod
    def _dims(full, ab):
        return (_rows(full), _cols(full)) if full is not None else (_rows(ab[0]), _cols(ab[1]))

    @property
    def shape(self):
        (a, b), (c, d) = self._dims(self.w1, self.w1_ab), self._dims(self.w2, self.w2_ab)
        return (a * c, b * d)

    def delta(self, xp):
        return kron(self._factor(xp, self.w1, self.w1_ab), self._factor(xp, self.w2, self.w2_ab)) * self.scale


@dataclass
class LoHa:
    w1_a: object
    w1_b: object
    w2_a: object
    w2_b: object
    scale: float

    kind = "loha"

    @property
    def shape(self):
        return (_rows(self.w1_a), _cols(self.w1_b))

    def delta(self, xp):
        one = as2d(xp, self.w1_a) @ as2d(xp, self.w1_b)
        two = as2d(xp, self.w2_a) @ as2d(xp, self.w2_b)
        return one * two * self.scale


@dataclass
class Full:
    diff: object

    kind = "diff"

    @property
    def shape(self):
        return tuple(int(d) for d in self.diff.shape)

    def delta(self, xp):
        return xp.array(self.diff)


@dataclass
class DoRA:
    """Weight-decomposed LoRA: W' = m · (W + ΔW) / ‖W + ΔW‖, the norm per output row (PEFT `lora_magnitude_vector`,
    ai-toolkit `.magnitude`, LyCORIS `dora_scale` [out, 1]) or per input column (LyCORIS `dora_scale` [1, in])."""
    inner: LoRA | LoKr | LoHa
    magnitude: object
    per_row: bool

    kind = "dora"

    @property
    def shape(self):
        return self.inner.shape

    def target(self, xp, region):
        merged = region + self.inner.delta(xp)
        m = xp.array(self.magnitude)
        if self.per_row:
            return merged * (m.reshape(-1, 1) / xp.rownorm(merged))
        return merged * (m.reshape(1, -1) / xp.colnorm(merged))


def apply(xp, region, adapter, strength: float):
    """The new float32 region after one adapter at `strength`.

    Additive adapters: region + s·ΔW. DoRA: region + s·(W_dora - region), so strength 0 leaves the weight alone and
    1 is exactly the trained DoRA weight (ComfyUI's convention; PEFT's `fuse_lora(lora_scale=s)` instead scales ΔW
    inside the norm, which agrees at s = 1 only)."""
    if adapter.kind == "dora":
        return region + (adapter.target(xp, region) - region) * strength
    delta = adapter.delta(xp)
    if tuple(delta.shape) != tuple(region.shape):   # a `.diff` stored as [out, in, 1, 1] or a bias as [out, 1]
        delta = delta.reshape(region.shape)
    return region + delta * strength
