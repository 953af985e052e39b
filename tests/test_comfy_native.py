"""ComfyUI's own klein / Z-Image model classes vs ours (bench/comfy_native.py): skipped unless COMFYUI_DIR points at a
ComfyUI checkout or at a copy made by `bench/comfy_native.py --prepare` (see its docstring).

Both models run in ONE subprocess (`bench/comfy_native.py --check`), so ComfyUI is never imported into the pytest
process (tests/test_nodes.py checks that the pack imports without it). The interpreter is ComfyUI's own, as for
tests/test_comfy_memory.py: $COMFYUI_PYTHON, else a venv next to or inside the checkout (e.g. /work/comfy/venv for
/work/comfy/ComfyUI, which has ComfyUI's requirements and imports flux_core), else this interpreter (for a prepared
copy, whose `_site/` brings comfy_kitchen and einops; comfy_aimdo is stubbed). Float32 on the CPU at tiny sizes,
same random weights, one step: relative L2 <= 1e-4. Measured at ComfyUI 4f874c5: klein 1.5e-7, klein + 1 reference
1.2e-7, Z-Image 5.8e-6 (6.2e-6 with caption and image pad tokens).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from comfy_server import comfy_python

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")]
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "comfy_native.py"


@pytest.fixture(scope="module")
def report() -> dict:
    comfy_dir = Path(COMFYUI_DIR).resolve()
    res = subprocess.run([comfy_python(comfy_dir), str(SCRIPT), "--check", str(comfy_dir)], capture_output=True,
                         text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["klein_ref0", "klein_ref1", "zimage_aligned", "zimage_padded"])
def test_comfyui_model_matches_ours(report, case):
    """One step of ComfyUI's Flux / NextDiT (called as model_base calls it) equals ours in our layout and sign."""
    assert report["rel_l2"][case] <= 1e-4, (case, report["rel_l2"], report["setup"])


def test_parameters_are_what_model_detection_derives(report):
    """Full-size klein-4B / Z-Image-Turbo: our constructor parameters == comfy.model_detection's (where importable:
    it pulls transformers, torchvision and scipy, which a bare prepared copy may lack)."""
    det = report["detection"]
    if det["status"].startswith("unavailable"):
        pytest.skip(det["status"])
    assert det["status"] == "match", det


def test_importing_the_bench_module_imports_no_comfyui():
    """Only add_comfy_to_path imports ComfyUI (and `--check DIR` in the report's argv, which ComfyUI's own parser
    would reject, shows that it never parses our argv)."""
    code = "import sys; sys.path.insert(0, 'bench'); import comfy_native; assert 'comfy' not in sys.modules; print('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.stdout.strip() == "ok", res.stderr[-2000:]
