"""Every shipped workflow (UI format in workflows/, API format in workflows/api/) checked against the node
definitions, and each API workflow run through the nodes in-process on tiny checkpoints under the standard names."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from comfy_harness import (NATIVE_STANDINS, check_api_workflow, check_ui_workflow, load_workflows, object_info,
                           run_api_workflow, ui_to_api)

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = load_workflows(ROOT / "workflows")
NAMES = sorted(WORKFLOWS)
EXPECTED = {"fluxcore_klein_text_to_image", "fluxcore_klein_edit", "fluxcore_klein_multi_reference",
            "fluxcore_klein_base_cfg", "fluxcore_zimage_turbo_text_to_image", "fluxcore_klein_lora",
            "fluxcore_zimage_lora"}
STANDARD_FILES = {"flux-2-klein-4b.safetensors", "flux-2-klein-base-4b.safetensors", "qwen_3_4b.safetensors",
                  "flux2-vae.safetensors", "z_image_turbo_bf16.safetensors", "ae.safetensors"}


@pytest.fixture(scope="module")
def info(tmp_path_factory):
    """Node definitions as /object_info would give them, with the tiny checkpoints under the standard names
    (so the loaders' file combos list exactly what a user who followed docs/COMFYUI.md has)."""
    import nodes
    from flux_core.demo import write_demo_checkpoints
    from nodes import host

    from lora_fixtures import write_demo_loras

    paths = write_demo_checkpoints(tmp_path_factory.mktemp("models"))
    write_demo_loras(paths)   # tiny LoRAs under the names the LoRA workflows pick
    host.set_model_roots([paths["klein"].parents[1]])
    yield object_info(nodes.NODE_CLASS_MAPPINGS, nodes.NODE_DISPLAY_NAME_MAPPINGS)
    host.set_model_roots([])


def test_the_workflows_ship_with_api_twins():
    assert set(NAMES) == EXPECTED
    for name in NAMES:
        assert WORKFLOWS[name][1] is not None, f"workflows/api/{name}.json is missing"


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_is_valid(name, info):
    ui, _ = WORKFLOWS[name]
    assert check_ui_workflow(ui, info) == []


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_is_valid_and_twin_of_ui(name, info):
    ui, api = WORKFLOWS[name]
    assert check_api_workflow(api, info) == []
    strip = lambda g: {k: (v["class_type"], v["inputs"]) for k, v in g.items()}  # noqa: E731
    assert strip(api) == strip(ui_to_api(ui, info)), "the API twin is not the UI file's Export (API)"


# What the sampler shows on opening: the variant's real defaults, never the node's "auto" values (0 / -1).
SHIPPED_SAMPLER = {"fluxcore_klein_text_to_image": (4, 1.0), "fluxcore_klein_edit": (4, 1.0),
                   "fluxcore_klein_multi_reference": (4, 1.0), "fluxcore_klein_base_cfg": (50, 4.0),
                   "fluxcore_zimage_turbo_text_to_image": (8, 0.0), "fluxcore_klein_lora": (4, 1.0),
                   "fluxcore_zimage_lora": (8, 0.0)}


@pytest.mark.parametrize("name", NAMES)
def test_opens_fitted_with_real_numbers(name, info):
    """No saved view (the frontend then fits the graph to the window, as for its own templates); the sampler
    shows the steps, guidance and size it will use; every link runs forward into a column further right (a link
    into a node left of its source is drawn behind that node)."""
    ui, api = WORKFLOWS[name]
    assert "ds" not in ui.get("extra", {}), "a saved view opens off-frame in other windows and frontends"
    (sampler,) = [n["inputs"] for n in api.values() if n["class_type"] == "FluxCoreSampler"]
    assert (sampler["steps"], sampler["guidance"]) == SHIPPED_SAMPLER[name]
    assert (sampler["width"], sampler["height"]) == (1024, 1024)
    nodes = {n["id"]: n for n in ui["nodes"]}
    for _, src, _, dst, _, _ in ui["links"]:
        a, b = nodes[src], nodes[dst]
        assert a["pos"][0] + a["size"][0] < b["pos"][0], f"link {a['type']} -> {b['type']} runs backwards"
    boxes = [(n["pos"][0], n["pos"][1] - 40, n["size"][0], n["size"][1] + 40) for n in ui["nodes"]]  # + title
    for i, p in enumerate(boxes):
        for q in boxes[i + 1:]:
            assert not (p[0] < q[0] + q[2] and q[0] < p[0] + p[2] and p[1] < q[1] + q[3] and q[1] < p[1] + p[3])


@pytest.mark.parametrize("name", NAMES)
def test_loaders_name_standard_files_with_download_addresses(name, info):
    ui, _ = WORKFLOWS[name]
    models = [m for n in ui["nodes"] for m in n.get("properties", {}).get("models", [])]
    loaders = [n for n in ui["nodes"] if n["type"].startswith("FluxCore") and n["type"].endswith("Loader")
               and n["type"] != "FluxCoreLoraLoader"]   # LoRAs are the user's own files: no download address
    assert len(loaders) == 3 and all(n.get("properties", {}).get("models") for n in loaders)
    assert {m["name"] for m in models} <= STANDARD_FILES
    for m in models:
        assert m["url"].startswith("https://huggingface.co/Comfy-Org/") and "/resolve/main/" in m["url"]


def test_checker_catches_broken_workflows(info):
    ui, api = WORKFLOWS["fluxcore_klein_edit"]
    bad = copy.deepcopy(ui)
    sampler = next(n for n in bad["nodes"] if n["type"] == "FluxCoreSampler")
    sampler["widgets_values"][1] = "sometimes"                       # control_after_generate value
    sampler["widgets_values"][4] = 8193                               # width above max
    loader = next(n for n in bad["nodes"] if n["type"] == "FluxCoreKleinModelLoader")
    loader["widgets_values"][0] = "flux-2-klein-9b.safetensors"       # a file the user does not have
    bad["links"][0][5] = "IMAGE"                                      # link type
    encode = next(n for n in bad["nodes"] if n["type"] == "FluxCoreReferenceImageEncode")
    encode["widgets_values"] = []                                     # widget count
    problems = " | ".join(check_ui_workflow(bad, info))
    for needle in ("control_after_generate value 'sometimes'", "width: 8193 > max", "flux-2-klein-9b", "IMAGE",
                   "0 widgets_values for 1 widget slots", "is not the file the node's widget picks"):
        assert needle in problems, (needle, problems)
    bad_api = copy.deepcopy(api)
    sampler_id = next(k for k, v in bad_api.items() if v["class_type"] == "FluxCoreSampler")
    bad_api[sampler_id]["inputs"]["positive"] = [next(k for k, v in bad_api.items()
                                                      if v["class_type"] == "LoadImage"), 0]
    del bad_api[sampler_id]["inputs"]["model"]
    bad_api[sampler_id]["inputs"]["steps"] = -3
    problems = " | ".join(check_api_workflow(bad_api, info))
    for needle in ("positive gets IMAGE", "required input model missing", "steps: -3 < min 0"):
        assert needle in problems, (needle, problems)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_runs_in_process(name, info):
    """The graph as ComfyUI would execute it, on tiny checkpoints; sizes shrunk to 64 px (edits: 0 = from the
    reference), and klein base's 50 steps cut to 4 (each CFG step is two forwards over 512 text tokens)."""
    _, api = WORKFLOWS[name]
    api = copy.deepcopy(api)
    edit = "edit" in name or "multi" in name
    for node in api.values():
        for key in ("width", "height"):
            if key in node["inputs"]:
                node["inputs"][key] = 0 if edit else 64  # edits: 0 = follow the first reference
        if node["class_type"] == "FluxCoreSampler" and name == "fluxcore_klein_base_cfg":
            node["inputs"]["steps"] = 4
    NATIVE_STANDINS["SaveImage"].SAVED.clear()
    out = run_api_workflow(api, __import__("nodes").NODE_CLASS_MAPPINGS)
    saved = NATIVE_STANDINS["SaveImage"].SAVED
    assert len(saved) == 1
    prefix, images = saved[0]
    assert prefix.startswith("fluxcore_") and images.shape[0] == 1 and images.shape[-1] == 3
    if edit:
        assert tuple(images.shape[1:3]) == (96, 80)  # the stand-in reference image's size, as diffusers does
    else:
        assert tuple(images.shape[1:3]) == (64, 64)
    badges = {api[k]["class_type"]: v["ui"]["fluxcore"][0]["badge"] for k, v in out.items() if "fluxcore" in v["ui"]}
    sampler_badge = badges["FluxCoreSampler"]
    if name == "fluxcore_klein_base_cfg":
        assert "50 steps" in badges["FluxCoreKleinModelLoader"]  # the variant's default, shown by the loader
        assert "4 steps" in sampler_badge and "cfg 4" in sampler_badge
    elif "zimage" in name:
        assert "zimage-turbo" in sampler_badge and "8 steps" in sampler_badge and "no cfg" in sampler_badge
    else:
        assert "4 steps" in sampler_badge and "no cfg" in sampler_badge
    assert torch.isfinite(images).all()
