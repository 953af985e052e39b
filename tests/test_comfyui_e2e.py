"""End to end against a real ComfyUI (skipped unless COMFYUI_DIR points at a checkout; see docs/COMFYUI.md).

Starts ComfyUI on loopback (--cpu) with the pack symlinked into custom_nodes/ and the tiny checkpoints under the
standard file names, then drives it the way automation does: /object_info, /upload/image, POST /prompt for each
API workflow, progress on /ws, the image from /history + /view; a run interrupted mid-sampling with /interrupt and
the next prompt succeeding; a failing prompt that leaves the server and models usable; /free releasing our cache.
"""
from __future__ import annotations

import copy
import io
import os
import uuid
from pathlib import Path

import pytest

from comfy_harness import check_api_workflow, check_ui_workflow, load_workflows, node_info
from comfy_server import ComfyServer, cleanup, follow, png_bytes, prepare_base

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")]
ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = load_workflows(ROOT / "workflows")
REFERENCES = {"fluxcore_reference.png": (200, 150, 1), "fluxcore_reference_2.png": (128, 192, 2)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    prepare_base(base)
    # --preview-method auto: exercise the step previews (binary WS frames) too
    srv = ComfyServer(Path(COMFYUI_DIR), base, ["--preview-method", "auto"]).start()
    try:
        for name, (w, h, seed) in REFERENCES.items():
            assert srv.upload_image(name, png_bytes(w, h, seed))["name"] == name
        yield srv
    finally:
        srv.stop()
        log = srv.log()
        if os.environ.get("COMFYUI_E2E_LOG"):  # keep the server log for a look
            Path(os.environ["COMFYUI_E2E_LOG"]).write_text(log)
        cleanup(base)
        assert "Traceback" not in log.split("Starting server")[0], log[-3000:]  # the pack imported cleanly


@pytest.fixture()
def ws(server):
    client = uuid.uuid4().hex
    sock = server.websocket(client)
    sock.client_id = client
    yield sock
    sock.close()


def small(api: dict, steps: int | None = None, size: int = 64) -> dict:
    """Shrink a shipped API workflow for tiny checkpoints on a CPU (sizes and, optionally, steps)."""
    api = copy.deepcopy(api)
    for node in api.values():
        if node["class_type"] == "FluxCoreSampler":
            for key in ("width", "height"):
                node["inputs"][key] = size
            if steps is not None:
                node["inputs"]["steps"] = steps
    return api


def run_prompt(server, ws, api, workflow=None):
    status, body = server.queue(api, ws.client_id, workflow)
    assert status == 200 and not body.get("node_errors"), body
    return body["prompt_id"], follow(ws, body["prompt_id"])


def test_object_info_matches_our_definitions_and_workflows_validate(server):
    import nodes

    live = server.get("/object_info")
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        assert name in live, f"{name} is not registered: see the server log"
        ours = node_info(name, cls, nodes.NODE_DISPLAY_NAME_MAPPINGS[name])
        for key in ("output", "output_name", "display_name", "category", "description", "search_aliases",
                    "input_order"):
            assert live[name][key] == ours[key], (name, key)
    # the shipped files against the REAL definitions (file combos list the server's models folder)
    for wf_name, (ui, api) in WORKFLOWS.items():
        assert check_ui_workflow(ui, live) == [], wf_name
        assert check_api_workflow(api, live) == [], wf_name
    exts = server.get("/extensions")
    for js in ("fluxcore_badge.js", "fluxcore_size_warning.js", "fluxcore_snap.js"):
        assert f"/extensions/comfyui-fluxcore/{js}" in exts
    templates = server.get("/workflow_templates")
    assert sorted(templates["comfyui-fluxcore"]) == sorted(WORKFLOWS)


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_api_workflow_runs_on_the_server(server, ws, name):
    from PIL import Image

    ui, api = WORKFLOWS[name]
    edit = "edit" in name or "multi" in name
    # edits at size 0 (the node's "follow the first reference"); the shipped 1024x1024 shrunk to 64 otherwise
    prompt_id, msgs = run_prompt(server, ws, small(api, steps=4 if "base" in name else None, size=0 if edit else 64),
                                 ui)
    kinds = [m["type"] if isinstance(m, dict) else "preview" for m in msgs]
    assert "execution_success" in kinds, msgs[-3:]
    sampler_id = next(k for k, v in api.items() if v["class_type"] == "FluxCoreSampler")
    progress = [m["data"] for m in msgs if isinstance(m, dict) and m["type"] == "progress"
                and m["data"]["node"] == sampler_id]
    assert progress and progress[-1]["value"] == progress[-1]["max"] > 0
    badges = {m["data"]["node"]: m["data"]["output"]["fluxcore"][0]["badge"] for m in msgs
              if isinstance(m, dict) and m["type"] == "executed" and "fluxcore" in (m["data"]["output"] or {})}
    assert sampler_id in badges and "torch:cpu" in badges[sampler_id]
    if "zimage" in name:  # Z-Image previews decode on the tiny model (klein's go through the same path)
        assert "preview" in kinds
    history = server.history(prompt_id)
    assert history["status"]["completed"]
    save_id = next(k for k, v in api.items() if v["class_type"] == "SaveImage")
    (image,) = history["outputs"][save_id]["images"]
    png = Image.open(io.BytesIO(server.view(image)))
    # edits: width/height 0 follow the first reference, 200x150 cropped to multiples of 16
    expected = (192, 144) if edit else (64, 64)
    assert png.size == expected, png.size


def test_interrupt_mid_sampling_then_next_prompt_succeeds(server, ws):
    _, api = WORKFLOWS["fluxcore_klein_base_cfg"]
    long_api = small(api, steps=200)
    status, body = server.queue(long_api, ws.client_id)
    assert status == 200
    prompt_id = body["prompt_id"]
    sampler_id = next(k for k, v in api.items() if v["class_type"] == "FluxCoreSampler")
    ws.sock.settimeout(300)
    while True:  # wait until the sampler is really running
        m = ws.recv()
        if isinstance(m, dict) and m["type"] == "progress" and m["data"]["node"] == sampler_id:
            assert m["data"]["max"] == 200
            break
    assert server.post("/interrupt", {"prompt_id": prompt_id})[0] == 200
    msgs = follow(ws, prompt_id)
    assert msgs[-1]["type"] == "execution_interrupted", msgs[-1]
    done = [m["data"]["value"] for m in msgs if isinstance(m, dict) and m["type"] == "progress"
            and m["data"]["node"] == sampler_id]
    assert not done or max(done) < 200  # stopped mid-sampling
    _, after = run_prompt(server, ws, small(WORKFLOWS["fluxcore_klein_text_to_image"][1]))
    assert after[-1]["type"] in ("execution_success", "executing"), after[-1]


def test_failed_prompt_leaves_server_and_models_usable(server, ws):
    _, api = WORKFLOWS["fluxcore_klein_text_to_image"]
    bad = small(api)
    loader = next(k for k, v in bad.items() if v["class_type"] == "FluxCoreKleinModelLoader")
    bad[loader]["inputs"]["model_name"] = "z_image_turbo_bf16.safetensors"  # valid file, wrong loader
    _, msgs = run_prompt(server, ws, bad)
    err = msgs[-1]
    assert err["type"] == "execution_error", err
    assert "Z-Image Model Loader" in err["data"]["exception_message"]
    invalid = small(api)
    sampler = next(k for k, v in invalid.items() if v["class_type"] == "FluxCoreSampler")
    del invalid[sampler]["inputs"]["model"]
    invalid[sampler]["inputs"]["steps"] = 999
    status, body = server.queue(invalid, ws.client_id)
    assert status == 400  # validation failure answered at POST time, nothing queued
    errors = {e["type"] for e in body["node_errors"][sampler]["errors"]}
    assert errors == {"required_input_missing", "value_bigger_than_max"}, body
    _, msgs = run_prompt(server, ws, small(api))
    assert msgs[-1]["type"] in ("execution_success", "executing")


def test_free_releases_our_cache_and_next_run_reloads(server, ws):
    import time

    _, api = WORKFLOWS["fluxcore_zimage_turbo_text_to_image"]
    run_prompt(server, ws, small(api))
    released = server.log().count("FluxCore models")
    # ComfyUI's worker reads /free's flag when it wakes, and a /free that lands while it is not waiting (its
    # post-run clean-up) only wakes it at the next prompt or timer: post again until the release happens.
    deadline = time.time() + 60
    while server.log().count("FluxCore models") == released:
        assert time.time() < deadline, "no release of the FluxCore cache within 60 s of /free"
        assert server.post("/free", {"unload_models": True})[0] == 200
        time.sleep(0.5)
    assert "releasing" in server.log()
    api2 = small(api)
    sampler = next(k for k, v in api2.items() if v["class_type"] == "FluxCoreSampler")
    api2[sampler]["inputs"]["seed"] = 43  # the loaders stay cached in ComfyUI; their handles reload the weights
    _, msgs = run_prompt(server, ws, api2)
    assert msgs[-1]["type"] in ("execution_success", "executing")


def test_comfyui_bundled_tokenizer_matches_reference():
    """Users with only qwen_3_4b.safetensors get ComfyUI's bundled Qwen tokenizer: same ids as Qwen's own."""
    from conftest import QWEN_TOKENIZER_DIR
    from flux_core.text import QwenTokenizer, apply_template

    bundled = QwenTokenizer(Path(COMFYUI_DIR) / "comfy" / "text_encoders" / "qwen25_tokenizer")
    ref = QwenTokenizer(QWEN_TOKENIZER_DIR)
    for mode in ("klein", "zimage"):
        text = apply_template("a red fox, 日本語, émoji 🦊 <think>", mode)
        assert bundled.encode(text) == ref.encode(text)
