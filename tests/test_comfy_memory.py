"""Our models under ComfyUI's real memory management (nodes/memory.py): skipped unless COMFYUI_DIR points at a
ComfyUI checkout (see docs/COMFYUI.md). The check runs in ComfyUI's own python (tests/comfy_memory_check.py):
load_models_gpu registers and loads our patcher (resident), a small model_unload shrinks it to streamed blocks and
keeps it registered, unload_all_models moves it to the host and drops it, a second load brings it back; the output
is bit-identical at every stage. Under --lowvram the load goes straight to blocks."""
import json
import os
import subprocess
from pathlib import Path

import pytest

from comfy_server import comfy_python

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")]
SCRIPT = Path(__file__).with_name("comfy_memory_check.py")


def _run(*extra) -> dict:
    res = subprocess.run([comfy_python(Path(COMFYUI_DIR)), str(SCRIPT), COMFYUI_DIR, *extra], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_patcher_follows_comfyui_memory_management():
    r = _run()
    assert r["registered"] and r["after_load"] == "resident" and r["same_after_load"]
    assert r["unload_small_returns"] is False and r["after_partial_unload"] == "blocks" and r["same_streamed"]
    assert r["after_unload_all"] == "host" and not r["still_registered"]
    assert r["after_reload"] == "resident" and r["same_after_reload"]
    assert r["resolve_auto"] == "auto" and not r["lowvram"]


def test_lowvram_streams_blocks():
    r = _run("lowvram")
    assert r["lowvram"] and r["resolve_auto"] == "blocks"
    assert r["after_load"] == "blocks" and r["same_after_load"] and r["after_reload"] == "blocks"
