"""bench/summary_report.py is what turns device calls into bench/results/summary.json: its merging must keep each
figure beside the peer of its own call."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from summary_report import merge_mlx, summarize  # noqa: E402


def _mlx(k=None, kt=None, z=None, zt=None):
    return {"mlx_cuda_step_1024_ms": {"klein_mlx": k, "klein_torch": kt, "zimage_mlx": z, "zimage_torch": zt},
            "notes": []}


def test_each_mlx_family_pair_comes_from_the_last_call_that_measured_both():
    got = merge_mlx([("call_a", _mlx(80, 60, 130, 105)), ("call_b", _mlx(71, 58)), ("call_c", _mlx(70, None))])
    assert got["mlx_cuda_step_1024_ms"] == {"klein_mlx": 71, "klein_torch": 58, "zimage_mlx": 130,
                                           "zimage_torch": 105}
    assert "mlx_cuda klein: from call_b" in got["notes"] and "mlx_cuda zimage: from call_a" in got["notes"]
    s = summarize({"mlx_cuda": [got]}, {})
    assert s["ratios"]["mlx_cuda_klein_vs_torch (goal <= 1)"] == round(71 / 58, 3)


def test_a_family_never_measured_stays_empty():
    got = merge_mlx([("only", _mlx(71, 58))])
    assert got["mlx_cuda_step_1024_ms"]["zimage_mlx"] is None and got["mlx_cuda_step_1024_ms"]["zimage_torch"] is None
