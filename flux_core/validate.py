"""Checks of user inputs, run before any model loads (CLI), or before any work (Python API, nodes).

One function per kind of input, each taking the name the caller shows the user (`--batch-size` on the command line,
`batch_size` in Python and on the node), so the CLI, the library and the nodes refuse the same values with the same
words. Values come back normalised (ints, floats, floored sizes, opened images).

Bounds:
- size: klein's RoPE has no trained position table, so its cap is ours: MAX_SIDE (8192 px a side, the node widget's
  limit). Z-Image's positions must stay inside the trained RoPE range `axes_lens` (512 patch rows/cols at patch 2 and
  VAE factor 8 = 8192 px); `size_limit` reads it from the loaded model.
- steps: MAX_STEPS (1000). The distilled models use 4-8 and the base models 50; more than a thousand Euler steps of a
  flow-matching model changes nothing visible and only burns time.
"""
from __future__ import annotations

import math
import numbers
import os
from pathlib import Path

from .errors import ConfigError

MAX_STEPS = 1000
MAX_SIDE = 8192
MIN_REFERENCE_SIDE = 64
DEVICES_TORCH = ("cpu", "cuda", "mps")
DEVICES_MLX = ("gpu", "cpu")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_batch(value, name: str = "batch_size") -> int:
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{name} must be at least 1 (images per run), got {value!r}")
    return value


def check_seed(value, name: str = "seed") -> int:
    from .families import MAX_SEED

    if not _is_int(value) or not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{name} must be a whole number from 0 to {MAX_SEED}, got {value!r}")
    return value


def check_steps(value, name: str = "steps") -> int | None:
    """None = the variant's default; otherwise 1..MAX_STEPS."""
    if value is None:
        return None
    if not _is_int(value) or not 1 <= value <= MAX_STEPS:
        raise ConfigError(f"{name} must be from 1 to {MAX_STEPS} (klein uses 4, base models 50), got {value!r}; "
                          "leave it out for the model's default")
    return value


def check_guidance(value, name: str = "guidance") -> float | None:
    """None = the variant's default; otherwise a finite number >= 0 (NaN would silently switch CFG off and end up
    in the metadata JSON, where strict parsers reject it)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0 (e.g. 4.0 for base models, 1.0 or 0 to switch CFG "
                          f"off), got {value!r}; leave it out for the model's default")
    return float(value)


def check_strength(value, has_init: bool, name: str = "strength", init_name: str = "init_image") -> float | None:
    """Image-to-image strength: only with an init image, in (0, 1] (1 = ignore the image)."""
    if value is None:
        return None
    if not has_init:
        raise ConfigError(f"{name} is only used with {init_name} (image-to-image): give {init_name} or drop {name}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"{name} must be above 0 and at most 1 (1 = ignore the image, 0.6 = keep its layout), "
                          f"got {value!r}")
    return float(value)


def check_prompt(value, name: str = "prompt") -> str:
    """A prompt must be text (None is not "None"), encodable as UTF-8 (a shell can pass undecodable bytes, which
    Python keeps as lone surrogates)."""
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {type(value).__name__}" +
                          (" (use \"\" for an empty prompt)" if value is None else ""))
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = value[e.start:e.end].encode("utf-8", "surrogateescape")
        raise ConfigError(f"{name} holds bytes that are not UTF-8 text ({bad!r} at character {e.start}); save or "
                          "type the prompt as UTF-8 (e.g. iconv -t UTF-8)") from None
    return value


def check_size(width, height, multiple: int = 16, max_side: int = MAX_SIDE,
               names: tuple[str, str] = ("width", "height")) -> tuple[int, int]:
    """(width, height) floored to `multiple`, each at least `multiple` and at most `max_side`."""
    out = []
    for value, name in zip((width, height), names):
        if not _is_int(value) or value < multiple:
            raise ConfigError(f"{name} must be a whole number of pixels, at least {multiple} and at most {max_side}, "
                              f"got {value!r}")
        if value > max_side:
            raise ConfigError(f"{name} {value} is too large: at most {max_side} px for this model (its trained "
                              "position range); generate smaller and upscale")
        out.append(value // multiple * multiple)
    return out[0], out[1]


def size_limit(model_config, family) -> int:
    """The largest side in pixels the model's position encoding covers (see the module docstring): a trained RoPE
    range (`axes_lens`: time, rows, columns of patches) times the patch and the latent factor, else MAX_SIDE."""
    lens = getattr(model_config, "axes_lens", None)
    if not lens or len(lens) < 3:
        return MAX_SIDE
    cells = min(int(lens[1]), int(lens[2])) * int(getattr(model_config, "patch_size", 1))
    return min(MAX_SIDE * 4, cells * family.latent_factor)


def check_device(backend: str, device, name: str = "device") -> str | None:
    """Refuse a device name no backend knows before any weights are read (availability is checked by backend.choose)."""
    if device in (None, "", "auto"):
        return None
    if not isinstance(device, str):
        raise ConfigError(f"{name} must be a name such as cuda, cuda:1, mps, cpu (torch) or gpu, cpu (mlx), got {device!r}")
    kind, _, index = device.partition(":")
    known = {"mlx": DEVICES_MLX, "torch": DEVICES_TORCH}.get(backend, DEVICES_TORCH + DEVICES_MLX)
    if kind not in known or (index and not (kind == "cuda" and index.isdigit())):
        raise ConfigError(f"unknown {name} {device!r} for backend {backend}: use one of "
                          f"{', '.join(known)}{' (or cuda:N)' if 'cuda' in known else ''}")
    return device


def open_image(source, what: str = "image", min_side: int = 1):
    """A path or an in-memory image -> RGB PIL image, fully decoded now, so a text file, a truncated PNG, a folder
    or a too-small image is reported with its name before any model loads."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        label = f"{what} {path}"
        if path.is_dir():
            raise ConfigError(f"{label} is a folder; give an image file (PNG, JPEG, WebP)")
        if not path.is_file():
            raise ConfigError(f"{label} not found")
        try:
            with Image.open(path) as img:
                img.load()  # decode now: a truncated file fails here, not halfway through the job
                image = img.convert("RGB")
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
            kind = "not an image PIL can read" if isinstance(e, UnidentifiedImageError) else f"unreadable ({e})"
            raise ConfigError(f"{label} is {kind}; give a PNG, JPEG or WebP image (re-save it if it is damaged)") from None
    else:
        from .pipeline import to_pil

        image = to_pil(source)
        name = getattr(source, "filename", "") or ""
        label = f"{what} {name}".strip()
    if min(image.size) < min_side:
        raise ConfigError(f"{label} is {image.size[0]}x{image.size[1]} px; it must be at least {min_side} px a side")
    return image
