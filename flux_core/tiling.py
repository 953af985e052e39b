"""Tiled VAE decode and encode: the tile plan and the blend weights, shared by the torch and MLX VAEs.

A big image is decoded as overlapping latent tiles; each tile's pixels are weighted by a ramp that rises linearly
across the overlap on every side that has a neighbour (flat 1 elsewhere, and at the image border), and the weighted
sum is divided by the sum of the weights. Encoding is the mirror image: pixel tiles, their latents blended the same
way in latent space. Only the plan and the 1-D ramps live here (numpy); each backend slices and accumulates.

Why tiles differ from the untiled result at all: the decoder's GroupNorms take their statistics over the whole
tile and its mid-block attention sees only the tile, and zero padding replaces the neighbours at tile borders.
The ramp hides the border region; the statistics difference remains and is what the tests bound (docs/MEMORY.md).

The decision (`resolve_tile`): "off" never tiles; a number is the tile side in pixels; "auto" tiles above
AUTO_PIXELS (about 2 MP), or when the device's free memory is known and the untiled decode would not fit in it.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from .errors import ConfigError

log = logging.getLogger(__name__)

AUTO_PIXELS = 2 * 1024 * 1024     # above ~2 MP, "auto" tiles
DEFAULT_TILE = 768                # pixels per tile side for "auto"
MIN_TILE = 64
# Peak decode working memory per output pixel and per byte of the compute dtype: the FLUX.2 VAE at 1024² in bf16
# took 2.55 GB above its weights on the H200 (docs/PERF.md §P9): 2.55e9 / 1024² / 2 bytes = 1217.
DECODE_BYTES_PER_PIXEL_PER_DTYPE_BYTE = 1220


def spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """(start, end) pairs covering 0..length with tiles of `tile` units overlapping by at least `overlap`, spread
    evenly (every start an integer). One span when the tile covers the whole length."""
    if tile >= length:
        return [(0, length)]
    if overlap >= tile:
        raise ConfigError(f"tile overlap {overlap} must be smaller than the tile {tile}")
    n = math.ceil((length - overlap) / (tile - overlap))
    starts = [round(k * (length - tile) / (n - 1)) for k in range(n)]
    return [(s, s + tile) for s in starts]


def ramp(span: tuple[int, int], length: int, ramp_len: int, scale: int) -> np.ndarray:
    """1-D float32 weights over one tile's OUTPUT extent ((end - start) * scale values): linear from ~0 to 1 over
    `ramp_len` output units on each side that has a neighbour, 1 elsewhere."""
    start, end = span
    n = (end - start) * scale
    w = np.ones(n, dtype=np.float32)
    r = min(ramp_len, n // 2)
    if r > 0:
        up = (np.arange(r, dtype=np.float32) + 0.5) / r      # never exactly 0: every pixel keeps some weight
        if start > 0:
            w[:r] = np.minimum(w[:r], up)
        if end < length:
            w[n - r:] = np.minimum(w[n - r:], up[::-1])
    return w


def plan(h: int, w: int, tile: int, overlap: int, scale: int):
    """Tiles of an h x w INPUT grid: [(y0, y1, x0, x1, wy, wx)], wy / wx the output-space ramps (scale x input)."""
    ys, xs = spans(h, tile, overlap), spans(w, tile, overlap)
    r = overlap * scale
    return [(y0, y1, x0, x1, ramp((y0, y1), h, r, scale), ramp((x0, x1), w, r, scale))
            for y0, y1 in ys for x0, x1 in xs]


def decode_geometry(tile_px: int, overlap_px: int | None = None, factor: int = 8) -> tuple[int, int]:
    """Pixel tile / overlap -> latent units (the raw VAE latent is 1/factor of the image per side)."""
    if tile_px < MIN_TILE or tile_px % factor:
        raise ConfigError(f"VAE tile size {tile_px} px: use a multiple of {factor} of at least {MIN_TILE} px")
    overlap_px = default_overlap(tile_px, factor) if overlap_px is None else overlap_px
    return tile_px // factor, max(1, overlap_px // factor)


def default_overlap(tile_px: int, factor: int = 8) -> int:
    """1/4 of the tile (at least 32 px), a multiple of the latent factor: wide enough for the ramps to cover the
    border artefacts."""
    return max(32, tile_px // 4 // factor * factor)


def decode_bytes(height: int, width: int, dtype_bytes: int) -> int:
    """Estimated peak working memory of an untiled decode (weights excluded)."""
    return int(height * width * dtype_bytes * DECODE_BYTES_PER_PIXEL_PER_DTYPE_BYTE)


def parse_option(option) -> str | int:
    """CLI / widget value -> "auto" | "off" | a tile size in pixels."""
    if option is None:
        return "auto"
    if isinstance(option, (int, np.integer)):
        return "off" if int(option) == 0 else int(option)
    s = str(option).strip().lower()
    if s in ("auto", "off"):
        return s
    if s in ("none", "0", "no", "false"):
        return "off"
    try:
        return int(s)
    except ValueError:
        raise ConfigError(f"--vae-tile {option!r}: use auto, off, or a tile size in pixels (e.g. 512)") from None


def resolve_tile(option, height: int, width: int, dtype_bytes: int = 2, free_bytes: int | None = None) -> int | None:
    """The tile side in pixels for an image of height x width, or None for an untiled pass."""
    choice = parse_option(option)
    if choice == "off":
        return None
    if choice != "auto":
        return None if choice >= max(height, width) else int(choice)
    need = decode_bytes(height, width, dtype_bytes)
    if height * width > AUTO_PIXELS:
        log.info("fluxcore: tiled VAE (%dx%d is above %.1f MP)", width, height, AUTO_PIXELS / 2**20)
        return DEFAULT_TILE if DEFAULT_TILE < max(height, width) else None
    if free_bytes is not None and need > 0.8 * free_bytes:
        tile = DEFAULT_TILE
        while tile > 256 and decode_bytes(tile, tile, dtype_bytes) > 0.8 * free_bytes:
            tile //= 2
        log.info("fluxcore: tiled VAE with %d px tiles (the untiled pass needs ~%.1f GB, %.1f GB free)",
                 tile, need / 1e9, free_bytes / 1e9)
        return tile if tile < max(height, width) else None
    return None
