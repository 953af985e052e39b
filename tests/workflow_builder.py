"""Writes the example workflows (workflows/*.json, UI format) and their API-format twins (workflows/api/*.json).

    /work/venv/bin/python tests/workflow_builder.py        # rewrites both folders

A developer tool: the JSON files are what ships and what the tests check (tests/test_workflows.py validates them
against the node definitions and checks that each API twin equals the UI file's "Export (API)"), so a workflow
edited and re-saved in ComfyUI is fine too. Node sockets are listed in definition order; widget values follow
the widget order of the definitions (see tests/comfy_harness.py widget_slots).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

HF = "https://huggingface.co/Comfy-Org"
# The public Comfy-Org download addresses (as in ComfyUI's own klein and Z-Image templates).
MODELS = {
    "flux-2-klein-4b.safetensors": (f"{HF}/flux2-klein/resolve/main/split_files/diffusion_models/", "diffusion_models"),
    "flux-2-klein-base-4b.safetensors": (f"{HF}/flux2-klein/resolve/main/split_files/diffusion_models/",
                                         "diffusion_models"),
    "z_image_turbo_bf16.safetensors": (f"{HF}/z_image_turbo/resolve/main/split_files/diffusion_models/",
                                       "diffusion_models"),
    "qwen_3_4b.safetensors": (f"{HF}/flux2-klein/resolve/main/split_files/text_encoders/", "text_encoders"),
    "flux2-vae.safetensors": (f"{HF}/flux2-dev/resolve/main/split_files/vae/", "vae"),
    "ae.safetensors": (f"{HF}/z_image_turbo/resolve/main/split_files/vae/", "vae"),
}
SIZES = {"FluxCoreQwen3Encode": [400, 300], "FluxCoreSampler": [320, 330], "LoadImage": [320, 360],
         "SaveImage": [520, 560]}


class Graph:
    def __init__(self, info: dict):
        self.info, self.nodes, self.links = info, [], []

    def add(self, type_, pos, widgets, inputs=None, title=None, model_file=None, mode=0):
        """inputs: {socket name: (node dict, output index)}; widgets: values in widget-slot order."""
        d = self.info[type_]
        node = {"id": len(self.nodes) + 1, "type": type_, "pos": list(pos), "size": SIZES.get(type_, [320, 160]),
                "flags": {}, "order": len(self.nodes), "mode": mode, "inputs": [], "outputs": [],
                "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets)}
        if title:
            node["title"] = title
        if model_file:
            base = model_file if isinstance(model_file, list) else [model_file]
            node["properties"]["models"] = [{"name": f, "url": MODELS[f][0] + f, "directory": MODELS[f][1]}
                                            for f in base]
        from comfy_harness import input_type, is_widget, ordered_inputs

        for _, name, spec in ordered_inputs(d):
            if not is_widget(spec):
                node["inputs"].append({"name": name, "type": input_type(spec), "link": None})
        for i, (t, n) in enumerate(zip(d["output"], d["output_name"])):
            node["outputs"].append({"name": n, "type": t, "links": [], "slot_index": i})
        self.nodes.append(node)
        for name, (src, slot) in (inputs or {}).items():
            self.link(src, slot, node, name)
        return node

    def link(self, src, slot, dst, name):
        lid = len(self.links) + 1
        tslot = next(i for i, x in enumerate(dst["inputs"]) if x["name"] == name)
        typ = src["outputs"][slot]["type"]
        self.links.append([lid, src["id"], slot, dst["id"], tslot, typ])
        src["outputs"][slot]["links"].append(lid)
        dst["inputs"][tslot]["link"] = lid

    def ui(self) -> dict:
        for n in self.nodes:
            for o in n["outputs"]:
                o["links"] = o["links"] or None
        return {"id": "00000000-0000-4000-8000-000000000000", "revision": 0, "last_node_id": len(self.nodes),
                "last_link_id": len(self.links), "nodes": self.nodes, "links": self.links, "groups": [],
                "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [40, 40]}}, "version": 0.4}


def loaders(g: Graph, model_file: str, vae_file: str, variant: str = "auto"):
    klein = "klein" in model_file
    te = g.add("FluxCoreTextEncoderLoader", (0, 0), ["qwen_3_4b.safetensors", "auto", "auto", "none", "auto", ""],
               model_file="qwen_3_4b.safetensors")
    m = g.add("FluxCoreKleinModelLoader" if klein else "FluxCoreZImageModelLoader", (0, 220),
              [model_file, "auto", "auto", "none", variant, False, "auto"], model_file=model_file)
    vae = g.add("FluxCoreVAELoader", (0, 440), [vae_file, "auto", "auto"], model_file=vae_file)
    return te, m, vae


def finish(g: Graph, m, pos, neg, vae, widgets, prefix, col=800):
    s = g.add("FluxCoreSampler", (col, 0), widgets,
              {"model": (m, 0), "positive": pos, **({"negative": neg} if neg else {})})
    d = g.add("FluxCoreVAEDecode", (col + 360, 0), ["auto"], {"vae": (vae, 0), "samples": (s, 0)})
    g.add("SaveImage", (col + 720, 0), [prefix], {"images": (d, 0)})


def build(info: dict) -> dict[str, dict]:
    out = {}

    g = Graph(info)
    te, m, vae = loaders(g, "flux-2-klein-4b.safetensors", "flux2-vae.safetensors")
    enc = g.add("FluxCoreQwen3Encode", (380, 0), ["a red fox sitting in fresh snow at sunrise, soft golden light, "
                                                  "shallow depth of field", "auto", ""],
                {"text_encoder": (te, 0), "model": (m, 0)})
    finish(g, m, (enc, 0), None, vae, [42, "randomize", 0, -1.0, 1024, 1024, 1, 1.0], "fluxcore_klein")
    out["fluxcore_klein_text_to_image"] = g.ui()

    g = Graph(info)
    te, m, vae = loaders(g, "flux-2-klein-4b.safetensors", "flux2-vae.safetensors")
    enc = g.add("FluxCoreQwen3Encode", (380, 0), ["Change the color of the bag to deep blue, keep everything else.",
                                                  "auto", ""], {"text_encoder": (te, 0), "model": (m, 0)})
    img = g.add("LoadImage", (380, 360), ["fluxcore_reference.png", "image"])
    ref = g.add("FluxCoreReferenceImageEncode", (800, 360), [False],
                {"conditioning": (enc, 0), "vae": (vae, 0), "image": (img, 0)})
    finish(g, m, (ref, 0), None, vae, [42, "randomize", 0, -1.0, 0, 0, 1, 1.0], "fluxcore_klein_edit", col=1200)
    out["fluxcore_klein_edit"] = g.ui()

    g = Graph(info)
    te, m, vae = loaders(g, "flux-2-klein-4b.safetensors", "flux2-vae.safetensors")
    enc = g.add("FluxCoreQwen3Encode", (380, 0), ["The person from the first image wearing the jacket from the "
                                                  "second image, standing in a city street.", "auto", ""],
                {"text_encoder": (te, 0), "model": (m, 0)})
    img1 = g.add("LoadImage", (380, 360), ["fluxcore_reference.png", "image"], title="Reference 1")
    img2 = g.add("LoadImage", (380, 760), ["fluxcore_reference_2.png", "image"], title="Reference 2")
    ref1 = g.add("FluxCoreReferenceImageEncode", (800, 360), [False],
                 {"conditioning": (enc, 0), "vae": (vae, 0), "image": (img1, 0)})
    ref2 = g.add("FluxCoreReferenceImageEncode", (800, 560), [False],
                 {"conditioning": (ref1, 0), "vae": (vae, 0), "image": (img2, 0)})
    finish(g, m, (ref2, 0), None, vae, [42, "randomize", 0, -1.0, 0, 0, 1, 1.0], "fluxcore_klein_multiref", col=1200)
    out["fluxcore_klein_multi_reference"] = g.ui()

    g = Graph(info)
    te, m, vae = loaders(g, "flux-2-klein-base-4b.safetensors", "flux2-vae.safetensors", variant="base")
    enc = g.add("FluxCoreQwen3Encode", (380, 0), ["a watercolor painting of a lighthouse on a cliff, stormy sea",
                                                  "auto", "blurry, low quality, watermark"],
                {"text_encoder": (te, 0), "model": (m, 0)})
    finish(g, m, (enc, 0), (enc, 1), vae, [42, "randomize", 0, 4.0, 1024, 1024, 1, 1.0], "fluxcore_klein_base")
    out["fluxcore_klein_base_cfg"] = g.ui()

    g = Graph(info)
    te, m, vae = loaders(g, "z_image_turbo_bf16.safetensors", "ae.safetensors")
    enc = g.add("FluxCoreQwen3Encode", (380, 0), ["a cozy reading nook by a rainy window, warm lamp light, "
                                                  "photorealistic", "auto", ""],
                {"text_encoder": (te, 0), "model": (m, 0)})
    finish(g, m, (enc, 0), None, vae, [42, "randomize", 0, -1.0, 1024, 1024, 1, 1.0], "fluxcore_zimage")
    out["fluxcore_zimage_turbo_text_to_image"] = g.ui()
    return out


def main() -> None:
    import nodes
    from comfy_harness import object_info, ui_to_api

    info = object_info(nodes.NODE_CLASS_MAPPINGS, nodes.NODE_DISPLAY_NAME_MAPPINGS)
    folder = ROOT / "workflows"
    (folder / "api").mkdir(parents=True, exist_ok=True)
    for name, wf in build(info).items():
        (folder / f"{name}.json").write_text(json.dumps(wf, indent=2) + "\n")
        (folder / "api" / f"{name}.json").write_text(json.dumps(ui_to_api(wf, info), indent=2) + "\n")
        print("wrote", name)


if __name__ == "__main__":
    main()
