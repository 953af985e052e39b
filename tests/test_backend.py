"""Backend choice (what auto picks and why, clear errors for unmet requests) and the CLI producing the same PNG on
MLX as on torch for the same seed."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from flux_core import backend
from flux_core.demo import write_demo_checkpoints
from flux_core.errors import ConfigError


def test_auto_prefers_mlx_on_apple_silicon(monkeypatch):
    monkeypatch.setattr(backend, "is_apple_silicon", lambda: True)
    monkeypatch.setattr(backend, "mlx_available", lambda: True)
    c = backend.choose("auto")
    assert c.backend == "mlx" and c.device == "gpu" and "Apple Silicon" in c.reason


def test_auto_on_a_mac_without_mlx_says_how_to_get_it(monkeypatch):
    import torch

    monkeypatch.setattr(backend, "is_apple_silicon", lambda: True)
    monkeypatch.setattr(backend, "mlx_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    c = backend.choose("auto")
    assert (c.backend, c.device) == ("torch", "mps") and "pip install mlx" in c.reason


def test_auto_elsewhere_is_torch_and_never_linux_mlx(monkeypatch):
    monkeypatch.setattr(backend, "is_apple_silicon", lambda: False)
    monkeypatch.setattr(backend, "mlx_available", lambda: True)
    c = backend.choose("auto")
    assert c.backend == "torch" and c.reason


def test_explicit_requests_that_cannot_be_met(monkeypatch):
    monkeypatch.setattr(backend, "is_apple_silicon", lambda: False)
    monkeypatch.setattr(backend, "mlx_available", lambda: False)
    with pytest.raises(ConfigError, match=r'pip install "mlx\[cpu\]"'):
        backend.choose("mlx")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            backend.choose("torch", "cuda")
    with pytest.raises(ConfigError, match="unknown backend"):
        backend.choose("jax")
    with pytest.raises(ConfigError, match="dtype"):
        backend.resolve_dtype("int3", backend.Choice("torch", "cpu", ""))


def test_dtype_defaults():
    assert backend.resolve_dtype("auto", backend.Choice("torch", "cpu", "")) == "float32"
    assert backend.resolve_dtype(None, backend.Choice("torch", "cuda", "")) == "bfloat16"
    assert backend.resolve_dtype("auto", backend.Choice("mlx", "gpu", "")) == "bfloat16"
    assert backend.resolve_dtype("auto", backend.Choice("mlx", "cpu", "")) == "float32"  # MLX CPU bf16 skips BLAS


@pytest.mark.slow
@pytest.mark.skipif(not backend.mlx_available(), reason="needs mlx (CI installs mlx[cpu])")
@pytest.mark.parametrize("model,vae", [("klein", "flux2_vae"), ("zimage", "flux1_vae")])
def test_cli_same_png_on_mlx_and_torch(tmp_path, model, vae):
    from flux_core.__main__ import main

    paths = write_demo_checkpoints(tmp_path / "ck")
    outs = {}
    for be in ("torch", "mlx"):
        outs[be] = tmp_path / f"{model}_{be}.png"
        rc = main(["generate", "--model", str(paths[model]), "--text-encoder", str(paths["text_encoder"]),
                   "--vae", str(paths[vae]), "--tokenizer", str(paths["tokenizer"]), "--prompt", "a lighthouse",
                   "--width", "64", "--height", "48", "--steps", "3", "--seed", "5", "--backend", be,
                   "--dtype", "float32", "--output", str(outs[be])])
        assert rc == 0
    a, b = (np.asarray(Image.open(outs[k]), dtype=np.int16) for k in ("torch", "mlx"))
    assert a.shape == b.shape == (48, 64, 3)
    assert np.abs(a - b).max() <= 2, "MLX and torch PNGs differ by more than 2/255"
    assert '"backend": "mlx"' in Image.open(outs["mlx"]).info["fluxcore"]
