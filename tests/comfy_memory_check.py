"""Run by tests/test_comfy_memory.py with ComfyUI's own python: our patcher inside the real model_management.

    python tests/comfy_memory_check.py COMFYUI_DIR [lowvram]    -> one JSON line on stdout

ComfyUI runs with --cpu here (no GPU on the test machine), so the patcher is made directly (nodes/memory.py's
patcher_for only hands out patchers for CUDA models) around an Offloader that copies on the CPU (copy=True): every
state change moves real bytes, and the model's output must stay bit-identical through load, partial unload, unload.
`lowvram` sets ComfyUI's VRAM state as --lowvram does (the flag itself cannot be combined with --cpu).
"""
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
comfy_dir = Path(sys.argv[1])
LOWVRAM = "lowvram" in sys.argv[2:]
sys.argv = [sys.argv[0], "--cpu"]
sys.path[:0] = [str(comfy_dir), str(ROOT)]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.model_management as mm  # noqa: E402
import torch  # noqa: E402

if LOWVRAM:
    mm.vram_state = mm.VRAMState.LOW_VRAM
spec = importlib.util.spec_from_file_location("fluxcore_memory", ROOT / "nodes" / "memory.py")
memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory)

from flux_core.configs import KleinConfig  # noqa: E402
from flux_core.demo import KLEIN  # noqa: E402
from flux_core.torch import offload as O  # noqa: E402
from flux_core.torch.klein import Flux2Transformer, position_ids, text_ids  # noqa: E402

torch.manual_seed(0)
net = Flux2Transformer(KleinConfig(**KLEIN)).eval().requires_grad_(False)
with torch.no_grad():
    for p in net.parameters():
        p.normal_(0, 0.2)
args = (torch.randn(1, 12, KLEIN["in_channels"]), position_ids(3, 4)[None], torch.randn(1, 5, KLEIN["context_in_dim"]),
        text_ids(5)[None], torch.tensor([0.5]))
with torch.inference_mode():
    want = net(*args)
off = O.offload(net, "cpu", "model", copy=True, exclusive=False)
patcher = memory._patcher_class()(off, torch.device("cpu"), torch.device("cpu"))
out = {"lowvram": memory.lowvram(), "resolve_auto": memory.resolve_offload("auto")}
mm.load_models_gpu([patcher], memory_required=1e6)
out["after_load"] = off.state
out["registered"] = any(m.model is patcher for m in mm.current_loaded_models)
with torch.inference_mode():
    out["same_after_load"] = bool(torch.equal(net(*args), want))
entry = next(m for m in mm.current_loaded_models if m.model is patcher)
out["unload_small_returns"] = entry.model_unload(memory_to_free=1)   # less than the model: shrink, stay loaded
out["after_partial_unload"] = off.state
with torch.inference_mode():
    out["same_streamed"] = bool(torch.equal(net(*args), want))
mm.unload_all_models()                                               # /free, the OOM handler
out["after_unload_all"] = off.state
out["still_registered"] = any(m.model is patcher for m in mm.current_loaded_models)
mm.load_models_gpu([patcher])
out["after_reload"] = off.state
with torch.inference_mode():
    out["same_after_reload"] = bool(torch.equal(net(*args), want))
print(json.dumps(out))
