import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The real Qwen3 byte-level BPE vocabulary, vendored (Apache-2.0, see tests/data/qwen-tokenizer/README.md) so that a
# fresh clone runs every tokenizer test. FLUXCORE_TEST_TOKENIZER may point at another copy of the same files.
QWEN_TOKENIZER_DIR = Path(os.environ.get("FLUXCORE_TEST_TOKENIZER", ROOT / "tests" / "data" / "qwen-tokenizer"))


@pytest.fixture(autouse=True)
def _deterministic():
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield


def rel_err(a, b) -> float:
    """max |a-b| / max |b|: the tolerance measure the issues use ("<= 1e-5 relative")."""
    import torch

    a = torch.as_tensor(a).double()
    b = torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
