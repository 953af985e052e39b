"""Output files: parameters embedded in PNG, JPEG and WebP (read back independently of our reader), atomic writes
(an interrupted batch leaves complete files and no truncated one), and output paths refused before any work."""
from __future__ import annotations

import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from flux_core import outputs
from flux_core.errors import ConfigError

PARAMS = {"model": "klein-4b", "prompt": "a fox — 狐", "negative_prompt": "", "seed": 7, "steps": 4,
          "guidance": 1.0, "width": 48, "height": 32}


def _images(n=3):
    return np.random.default_rng(0).random((n, 32, 48, 3)).astype(np.float32)


def _png_chunks(path):
    """(type, data) of every chunk, parsed from the bytes (not through Pillow)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, out = 8, []
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        assert zlib.crc32(kind + body) == struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0]
        out.append((kind, body))
        pos += 12 + n
    return out


def test_png_has_both_text_chunks(tmp_path):
    [path] = outputs.save_images(_images(1), tmp_path / "a.png", PARAMS)
    chunks = dict((k, v) for k, v in _png_chunks(path) if k in (b"tEXt", b"iTXt"))
    assert json.loads(chunks[b"tEXt"].split(b"\0", 1)[1]) == {**PARAMS, "batch_index": 0}
    assert "Steps: 4, CFG scale: 1.0, Seed: 7, Size: 48x32" in chunks[b"iTXt"].decode("utf-8")
    assert np.asarray(Image.open(path)).shape == (32, 48, 3)


@pytest.mark.parametrize("ext", [".jpg", ".jpeg", ".webp"])
def test_jpeg_and_webp_keep_the_parameters(tmp_path, ext):
    paths = outputs.save_images(_images(2), tmp_path / f"b{ext}", PARAMS)
    assert [p.name for p in paths] == [f"b_1{ext}", f"b_2{ext}"]
    raw = paths[1].read_bytes()
    assert b"fluxcore:json" in raw and b"UNICODE\0" in raw  # XMP packet and EXIF UserComment are in the file
    assert outputs.read_params(paths[1]) == {**PARAMS, "batch_index": 1}
    assert outputs.read_a1111(paths[0]).startswith("a fox — 狐\nSteps: 4")
    with Image.open(paths[0]) as img:
        assert img.format == {".webp": "WEBP"}.get(ext, "JPEG") and img.size == (48, 32)


def test_interrupted_batch_leaves_no_truncated_file(tmp_path, monkeypatch):
    (tmp_path / "c_2.png").write_bytes(b"an older complete file")
    real = outputs._encode
    calls = []

    def encode_then_interrupt(pil, f, fmt, params):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"\x89PNG\r\n\x1a\n half an image")  # bytes on disk, then Ctrl-C
            raise KeyboardInterrupt
        real(pil, f, fmt, params)

    monkeypatch.setattr(outputs, "_encode", encode_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        outputs.save_images(_images(3), tmp_path / "c.png", PARAMS)
    assert sorted(os.listdir(tmp_path)) == ["c_1.png", "c_2.png"]  # no temporary file left behind
    assert outputs.read_params(tmp_path / "c_1.png")["batch_index"] == 0  # the finished one is whole
    assert (tmp_path / "c_2.png").read_bytes() == b"an older complete file"  # never half-overwritten


def test_latent_is_written_atomically_with_its_parameters(tmp_path, monkeypatch):
    lat = torch.randn(1, 16, 4, 6)
    path = outputs.save_latent(lat, tmp_path / "l.safetensors", PARAMS)
    with safe_open(str(path), "pt") as f:
        assert torch.equal(f.get_tensor("latent"), lat) and json.loads(f.metadata()["fluxcore"]) == PARAMS

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="space"):
        outputs.save_latent(lat * 2, path, PARAMS)
    with safe_open(str(path), "pt") as f:
        assert torch.equal(f.get_tensor("latent"), lat)  # the old file is intact
    assert os.listdir(tmp_path) == ["l.safetensors"]


def test_non_finite_numbers_never_reach_the_metadata():
    with pytest.raises(ValueError):
        outputs.params_json({**PARAMS, "guidance": float("nan")})


def _unwritable(tmp_path):
    if os.geteuid() == 0:  # root ignores permission bits; /sys refuses new files even to root
        return "/sys"
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    return d


@pytest.mark.parametrize("case, fragment", [
    ("folder", "is a folder"), ("parent_file", "is a file, not a folder"), ("unwritable", "cannot write in"),
    ("extension", "unknown image type"),
])
def test_bad_output_paths_are_refused_before_work(tmp_path, case, fragment):
    (tmp_path / "f.txt").write_text("x")
    path = {"folder": tmp_path, "parent_file": tmp_path / "f.txt" / "out.png",
            "unwritable": f"{_unwritable(tmp_path)}/out.png", "extension": tmp_path / "out.bmp"}[case]
    with pytest.raises(ConfigError, match=fragment):
        outputs.check_output_path(path)


def test_good_output_paths_pass_and_missing_folders_are_fine(tmp_path):
    assert outputs.check_output_path(tmp_path / "new" / "deeper" / "x.webp").name == "x.webp"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert os.listdir(tmp_path) == []
