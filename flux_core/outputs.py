"""Writing results: images (PNG / JPEG / WebP with the generation parameters inside) and latents (safetensors).

Every file is written atomically: encoded into a temporary file in the destination folder, flushed to disk, then
renamed over the final name (`os.replace` is atomic within one filesystem). An interrupt or a full disk mid-batch
therefore leaves complete files and no truncated one under a good name. `check_output_path` runs before any model
loads, so a path that cannot be written fails in a second instead of after the generation.

Where the parameters go: PNG text chunks `fluxcore` (our JSON) and `parameters` (the A1111 text other tools read);
JPEG and WebP carry the same two in XMP (`fluxcore:json`) and EXIF UserComment (the A1111 convention), since
neither has PNG-style text chunks. `read_params` reads them back from any of the three.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from xml.sax.saxutils import escape

from .errors import ConfigError

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
JPEG_QUALITY = 95
_XMP_NS = "https://github.com/fluxcore/comfyui-fluxcore/ns/1.0/"
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286


# ------------------------------------------------------------------------------------------------ paths, atomicity
def image_paths(output: str | os.PathLike, count: int) -> list[Path]:
    """The file names a batch is written to: `output` itself for one image, `stem_1.ext`, `stem_2.ext` ... else."""
    out = Path(output).expanduser()
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i + 1}{out.suffix}") for i in range(count)]


def check_output_path(path: str | os.PathLike, what: str = "--output", formats=IMAGE_FORMATS) -> Path:
    """Refuse, before any work, an output that cannot be written: an existing folder, a parent that is a file, a
    folder without write permission, an unknown extension. Missing parent folders are fine (created on write)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"{what} {p} is a folder; give a file name inside it, e.g. {p / 'out.png'}")
    if formats is not None and p.suffix.lower() not in formats:
        raise ConfigError(f"{what} {p}: unknown image type {p.suffix or '(no extension)'!r}; end the name with "
                          f"{', '.join(sorted(set(formats)))}")
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{what} {p}: {parent} is a file, not a folder; choose another output path")
    try:  # os.access is wrong for root and for read-only mounts: create (and remove) a real file
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".fluxcore-check-"):
            pass
    except OSError as e:
        raise ConfigError(f"{what} {p}: cannot write in {parent} ({e.strerror or e}); choose a folder you can "
                          "write to") from None
    return p


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call `write(binary_file)` on a temporary file beside `path`, fsync it, then rename it to `path`.
    On any exception (KeyboardInterrupt included) the temporary file is removed and `path` is left untouched."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the user's usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------------------- images
def save_images(images, output: str | os.PathLike, params: dict) -> list[Path]:
    """[B, H, W, 3] float images in 0..1 -> files named by `image_paths`, the type chosen by the extension, the
    parameters embedded (with the image's batch index). Returns the paths written."""
    import numpy as np
    from PIL import Image

    paths = image_paths(output, len(images))
    fmt = IMAGE_FORMATS.get(paths[0].suffix.lower())
    if fmt is None:
        check_output_path(paths[0])  # raises the message naming the allowed extensions
    written = []
    for i, (img, path) in enumerate(zip(images, paths)):
        pil = Image.fromarray((np.clip(np.asarray(img, dtype=np.float32), 0, 1) * 255.0).round().astype("uint8"))
        meta = {**params, "batch_index": i}
        written.append(atomic_write(path, lambda f, pil=pil, meta=meta: _encode(pil, f, fmt, meta)))
    return written


def _encode(pil, f, fmt: str, params: dict) -> None:
    from PIL import Image, PngImagePlugin

    text = params_json(params)
    a1111 = a1111_text(params)
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("fluxcore", text)
        info.add_itxt("parameters", a1111)  # iTXt: UTF-8, so non-Latin prompts survive
        pil.save(f, format="PNG", pnginfo=info)
        return
    exif = Image.Exif()
    exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\0" + a1111.encode("utf-16-be")
    extra = {"quality": JPEG_QUALITY} if fmt == "JPEG" else {"lossless": False, "quality": JPEG_QUALITY}
    pil.save(f, format=fmt, exif=exif, xmp=_xmp(text), **extra)


def params_json(params: dict) -> str:
    """Our metadata JSON. NaN / Infinity are not JSON (strict parsers reject the file): refuse them here as a last
    guard; validation upstream already rejects non-finite numbers with a message naming the option."""
    return json.dumps(params, allow_nan=False)  # ASCII: a PNG tEXt chunk, readable by every tool


def a1111_text(p: dict) -> str:
    """The `parameters` text A1111 / Forge / civitai read: prompt, negative, then `Key: value` pairs."""
    text = str(p.get("prompt", ""))
    if p.get("negative_prompt"):
        text += f"\nNegative prompt: {p['negative_prompt']}"
    pairs = [("Steps", p.get("steps")), ("Sampler", p.get("sampler")), ("CFG scale", p.get("guidance")),
             ("Seed", p.get("seed")), ("Size", f"{p.get('width')}x{p.get('height')}"), ("Model", p.get("model")),
             ("Denoising strength", p.get("strength"))]
    pairs += [("Lora", f"{x['file']}:{x['strength']:g}") for x in p.get("loras", ())]
    return text + "\n" + ", ".join(f"{k}: {v}" for k, v in pairs if v is not None)


def _xmp(text: str) -> bytes:
    return ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
            '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<rdf:Description rdf:about="" xmlns:fluxcore="{_XMP_NS}"><fluxcore:json>{escape(text)}</fluxcore:json>'
            '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>').encode("utf-8")


def read_params(path: str | os.PathLike) -> dict | None:
    """The `fluxcore` parameters JSON from a PNG, JPEG or WebP we wrote (None when the file has none)."""
    import xml.etree.ElementTree as ET

    from PIL import Image

    with Image.open(path) as img:
        if "fluxcore" in img.info:
            return json.loads(img.info["fluxcore"])
        xmp = img.info.get("xmp")
    if not xmp:
        return None
    node = ET.fromstring(xmp.decode("utf-8") if isinstance(xmp, bytes) else xmp).find(f".//{{{_XMP_NS}}}json")
    return json.loads(node.text) if node is not None and node.text else None


def read_a1111(path: str | os.PathLike) -> str | None:
    """The A1111 `parameters` text (PNG text chunk, or EXIF UserComment in JPEG / WebP)."""
    from PIL import Image

    with Image.open(path) as img:
        if "parameters" in img.info:
            return img.info["parameters"]
        raw = img.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if not raw:
        return None
    if raw.startswith(b"UNICODE\0"):
        return raw[8:].decode("utf-16-be")
    return raw[8:].decode("ascii", "replace") if raw.startswith(b"ASCII\0\0\0") else raw.decode("utf-8", "replace")


# ------------------------------------------------------------------------------------------------------ latents
def save_latent(latent, path: str | os.PathLike, params: dict) -> Path:
    """The final latent as safetensors (key `latent`, native layout, float32), the parameters in the metadata."""
    import numpy as np
    import torch
    from safetensors.torch import save

    t = latent if isinstance(latent, torch.Tensor) else torch.as_tensor(np.asarray(latent))
    data = save({"latent": t.detach().float().cpu().contiguous()},
                metadata={"fluxcore": params_json(params), "layout": "native"})
    return atomic_write(path, lambda f: f.write(data))
