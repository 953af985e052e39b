"""Our LoRA merge against ComfyUI's own (`comfy.lora.load_lora` + `calculate_weight`, run in ComfyUI's venv by
tests/comfy_lora_oracle.py) for every fixture format ComfyUI reads. Opt-in: set COMFYUI_DIR (and COMFYUI_PYTHON).

Known, deliberate differences (docs/LORA.md), asserted rather than skipped:
  * DoRA `dora_scale` [out, 1]: ComfyUI normalises by the row norms of the UN-patched weight; LyCORIS and PEFT use
    the patched weight, as we do. Those weights must differ; the [1, in] (per-column) ones must agree.
  * raw musubi Z-Image (`lora_unet_layers_N_attention_to_q`): ComfyUI has no mapping for the split attention names
    and loads only the feed-forward part; attention weights stay untouched there.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from test_lora import _build

from flux_core.torch import lora as TL

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")]
HERE = Path(__file__).resolve().parent

KLEIN = ["ai_toolkit", "bfl_down_up", "kohya", "kohya_sparse", "diffsynth", "comfy", "lokr_full", "lokr_factor",
         "loha", "dora_scale", "diff"]
ZIMAGE = ["ai_toolkit", "musubi", "musubi_comfy", "musubi_diffusers", "diffsynth", "comfy", "lokr_full",
          "lokr_factor", "loha", "dora_scale", "diff"]


def _python() -> str:
    from comfy_server import comfy_python

    return comfy_python(Path(COMFYUI_DIR))


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    from safetensors.torch import save_file

    out = {}
    for family in ("klein", "zimage"):
        s = _build(family, tmp_path_factory.mktemp(f"lora_c_{family}"))
        s["base_file"] = str(s["root"] / "base_native.safetensors")
        save_file({k: v.contiguous() for k, v in s["base"].items()}, s["base_file"])
        cfg = s["model"].module.config
        s["cfg"] = (dict(depth=cfg.depth, depth_single_blocks=cfg.depth_single, hidden_size=cfg.hidden_size)
                    if family == "klein" else dict(n_layers=cfg.n_layers, dim=cfg.dim,
                                                   n_refiner_layers=cfg.n_refiner_layers))
        out[family] = s
    return out


def _comfy(s, family, fmt, strength):
    from safetensors.torch import load_file

    out = str(s["root"] / f"comfy_{fmt}.safetensors")
    subprocess.run([_python(), str(HERE / "comfy_lora_oracle.py"), COMFYUI_DIR, s["base_file"], family,
                    json.dumps(s["cfg"]), str(strength), out, s["files"][fmt]], check=True, capture_output=True)
    return load_file(out)


@pytest.mark.parametrize("family,fmt", [("klein", f) for f in KLEIN] + [("zimage", f) for f in ZIMAGE])
def test_merge_equals_comfyui(setups, family, fmt):
    s = setups[family]
    theirs = _comfy(s, family, fmt, 0.7)
    TL.apply_loras(s["model"].module, [(s["files"][fmt], 0.7)])
    ours = {k: v.detach().clone() for k, v in s["model"].module.state_dict().items()}
    TL.apply_loras(s["model"].module, [])
    fx = s["fixtures"][fmt]
    for e in fx.expect:
        mine = ours[e.key].double()
        got = theirs.get(e.key, s["base"][e.key]).double()
        err = float((mine - got).abs().max() / got.abs().max())
        if fmt == "dora_scale" and e.dora[1]:
            assert err > 1e-4, f"{e.key}: ComfyUI's per-row DoRA norm now matches ours; update the docstring"
        elif family == "zimage" and fmt == "musubi" and ".attention." in e.key:
            assert torch.equal(theirs.get(e.key, s["base"][e.key]), s["base"][e.key])
        else:
            assert err <= 1e-6, f"{family}/{fmt} {e.key}: ours vs ComfyUI {err:.2e}"
    assert np.isfinite(sum(float(v.abs().sum()) for v in ours.values()))
