"""ComfyUI's rules for node definitions and workflow files, written as checks, plus a tiny API-graph executor.

Used by tests/test_nodes.py and tests/test_workflows.py without ComfyUI, and by tests/test_comfyui_e2e.py against
a real server's /object_info. Everything works on `object_info`-style dicts (what GET /object_info returns, built
here the way server.py's node_info builds them), so the same checks run on our classes and on a live server.

Rules mirrored (from ComfyUI's own code, comfyanonymous/ComfyUI, a mid-2026 snapshot):
  - execution.py validate_inputs: required inputs present; links are [node_id, slot]; linked types match
    (comfy_execution/validation.py validate_node_input: equal, "*", or overlapping comma-separated sets);
    INT/FLOAT converted then checked against min/max; combo values in the option list.
  - The frontend's widget rules for UI-format files: widget inputs are INT, FLOAT, STRING, BOOLEAN, COMBO and
    option lists; `widgets_values` is positional in input order (required, then optional); an input with
    `control_after_generate` gets an extra value after it, and an `image_upload` combo an extra "image" value.
"""
from __future__ import annotations

import inspect
import json
import math
from collections import deque
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
MODEL_FOLDERS = {"diffusion_models", "text_encoders", "vae"}
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


# --------------------------------------------------------------------------------------------- node definitions
def node_info(name: str, cls, display_name: str | None = None) -> dict:
    """What GET /object_info says about a V1 class (server.py node_info, the fields the checks use)."""
    inputs = cls.INPUT_TYPES()
    return {
        "input": inputs,
        "input_order": {k: list(v.keys()) for k, v in inputs.items()},
        "output": list(cls.RETURN_TYPES),
        "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
        "name": name,
        "display_name": display_name or name,
        "description": getattr(cls, "DESCRIPTION", ""),
        "category": getattr(cls, "CATEGORY", "sd"),
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
        "search_aliases": list(getattr(cls, "SEARCH_ALIASES", [])),
    }


def object_info(mappings: dict, display: dict) -> dict:
    info = {name: node_info(name, cls, display.get(name)) for name, cls in mappings.items()}
    info.update({name: node_info(name, cls, NATIVE_DISPLAY[name]) for name, cls in NATIVE_STANDINS.items()})
    return info


def input_type(spec):
    t = spec[0]
    return "COMBO" if isinstance(t, list) else t


def input_options(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def is_widget(spec) -> bool:
    return input_type(spec) in WIDGET_TYPES


def combo_values(spec) -> list:
    return spec[0] if isinstance(spec[0], list) else input_options(spec).get("options", [])


def ordered_inputs(info: dict, sections=("required", "optional")):
    for sec in sections:
        for name in info["input_order"].get(sec, []):
            yield sec, name, info["input"][sec][name]


def widget_slots(info: dict) -> list[tuple[str, str]]:
    """The positions of `widgets_values`: (input name, "value" | "control" | "upload")."""
    slots = []
    for _, name, spec in ordered_inputs(info):
        if not is_widget(spec):
            continue
        slots.append((name, "value"))
        opts = input_options(spec)
        if opts.get("control_after_generate"):
            slots.append((name, "control"))
        if opts.get("image_upload"):
            slots.append((name, "upload"))
    return slots


def check_value(spec, value, name: str) -> str | None:
    """Why `value` is not valid for an input spec, or None (execution.py validate_inputs' literal checks)."""
    t, opts = input_type(spec), input_options(spec)
    if t == "COMBO":
        values = combo_values(spec)
        if opts.get("image_upload") and isinstance(value, str) and value.lower().endswith(IMAGE_EXTS):
            return None  # LoadImage lists the input folder, which differs per install; any image name is valid
        return None if value in values else f"{name}: {value!r} not in {values}"
    if t in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{name}: {value!r} is not a number"
        if t == "INT" and int(value) != value:
            return f"{name}: {value!r} is not an integer"
        if "min" in opts and value < opts["min"]:
            return f"{name}: {value} < min {opts['min']}"
        if "max" in opts and value > opts["max"]:
            return f"{name}: {value} > max {opts['max']}"
        return None
    if t == "STRING":
        return None if isinstance(value, str) else f"{name}: {value!r} is not a string"
    if t == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name}: {value!r} is not a boolean"
    return f"{name}: a literal given for socket type {t}"


def types_match(received, expected) -> bool:
    """comfy_execution/validation.py validate_node_input (non-strict)."""
    if received == expected or "*" in (received, expected):
        return True
    if not isinstance(received, str) or not isinstance(expected, str):
        return isinstance(received, list) and expected == "COMBO"
    a = {t.strip() for t in received.split(",")}
    b = {t.strip() for t in expected.split(",")}
    return "*" in a or "*" in b or bool(a & b)


def check_node_class(name: str, cls, display: dict) -> list[str]:
    """Every rule a V1 class must follow for ComfyUI (and our house rules). Returns the problems found."""
    p = []
    if not name.startswith("FluxCore"):
        p.append("id must start with FluxCore")
    if name not in display:
        p.append("no display name")
    if not str(getattr(cls, "CATEGORY", "")).startswith("FluxCore"):
        p.append("CATEGORY must be FluxCore or FluxCore/...")
    if not getattr(cls, "DESCRIPTION", "").strip():
        p.append("no DESCRIPTION")
    aliases = getattr(cls, "SEARCH_ALIASES", None)
    if not aliases or not all(isinstance(a, str) and a for a in aliases):
        p.append("SEARCH_ALIASES must be a non-empty list of strings")
    rt = getattr(cls, "RETURN_TYPES", None)
    if not isinstance(rt, tuple) or not all(isinstance(t, str) and t for t in rt):
        p.append("RETURN_TYPES must be a tuple of type strings")
        rt = ()
    for attr in ("RETURN_NAMES", "OUTPUT_TOOLTIPS"):
        if hasattr(cls, attr) and len(getattr(cls, attr)) != len(rt):
            p.append(f"{attr} must have one entry per output")
    fn = getattr(cls, getattr(cls, "FUNCTION", ""), None)
    if not callable(fn):
        p.append(f"FUNCTION {getattr(cls, 'FUNCTION', None)!r} is not a method")
        return p
    inputs = cls.INPUT_TYPES()
    if set(inputs) - {"required", "optional", "hidden"}:
        p.append(f"INPUT_TYPES has unknown sections {set(inputs) - {'required', 'optional', 'hidden'}}")
    params = inspect.signature(fn).parameters
    for sec in ("required", "optional", "hidden"):
        for iname, spec in inputs.get(sec, {}).items():
            if iname not in params and not any(x.kind == x.VAR_KEYWORD for x in params.values()):
                p.append(f"{iname}: not a parameter of {cls.FUNCTION}()")
            elif sec != "required" and iname in params and params[iname].default is inspect.Parameter.empty:
                p.append(f"{iname}: optional/hidden input needs a default in {cls.FUNCTION}()")
            if sec == "hidden":
                continue
            p += [f"{iname}: {e}" for e in _check_spec(spec)]
    try:
        json.dumps(node_info(name, cls, display.get(name)))
    except (TypeError, ValueError) as e:
        p.append(f"object_info is not JSON: {e}")
    return p


def _check_spec(spec) -> list[str]:
    p = []
    if not isinstance(spec, tuple) or not 1 <= len(spec) <= 2:
        return ["an input spec is a tuple (type,) or (type, options)"]
    t, opts = spec[0], input_options(spec)
    if len(spec) == 2 and not isinstance(spec[1], dict):
        p.append("options must be a dict")
    if not (isinstance(t, str) and t) and not (isinstance(t, list) and all(isinstance(x, str) for x in t)):
        p.append("type must be a string or a list of strings")
    if not opts.get("tooltip"):
        p.append("no tooltip")
    if isinstance(t, list):
        if "default" in opts and opts["default"] not in t:
            p.append(f"default {opts['default']!r} not among the options")
    elif t in ("INT", "FLOAT"):
        if "default" not in opts:
            p.append("numbers need a default")
        else:
            err = check_value(spec, opts["default"], "default")
            if err:
                p.append(err)
        if opts.get("step", 1) <= 0:
            p.append("step must be > 0")
        if "min" in opts and "max" in opts and opts["min"] > opts["max"]:
            p.append("min > max")
        if t == "INT" and any(not isinstance(opts.get(k, 0), int) for k in ("default", "min", "max", "step")):
            p.append("INT default/min/max/step must be integers")
    elif t == "BOOLEAN" and not isinstance(opts.get("default"), bool):
        p.append("BOOLEAN needs a bool default")
    elif t == "STRING" and not isinstance(opts.get("default", ""), str):
        p.append("STRING default must be a string")
    if opts.get("control_after_generate") and t != "INT":
        p.append("control_after_generate is for INT inputs")
    return p


# ------------------------------------------------------------------------------------------------ UI workflows
def check_ui_workflow(wf: dict, info: dict, allowed_native=("LoadImage", "SaveImage", "PreviewImage")) -> list[str]:
    p = []
    for key in ("nodes", "links", "last_node_id", "last_link_id", "version"):
        if key not in wf:
            p.append(f"missing top-level {key!r}")
    nodes = {n["id"]: n for n in wf.get("nodes", [])}
    if len(nodes) != len(wf.get("nodes", [])):
        p.append("duplicate node ids")
    if nodes and wf.get("last_node_id", 0) < max(nodes):
        p.append("last_node_id is below the largest node id")
    links = {}
    for link in wf.get("links", []):
        if not (isinstance(link, list) and len(link) == 6):
            p.append(f"link {link!r} is not [id, origin, origin_slot, target, target_slot, type]")
            continue
        links[link[0]] = link
    if links and wf.get("last_link_id", 0) < max(links):
        p.append("last_link_id is below the largest link id")
    for nid, node in nodes.items():
        t = node.get("type")
        where = f"node {nid} ({t})"
        if t not in info:
            p.append(f"{where}: unknown node type")
            continue
        if not t.startswith("FluxCore") and t not in allowed_native:
            p.append(f"{where}: only FluxCore nodes and {', '.join(allowed_native)} belong in our workflows")
        p += [f"{where}: {e}" for e in _check_ui_node(node, info[t], links)]
    for lid, (_, o, os_, tgt, ts, typ) in links.items():
        if o not in nodes or tgt not in nodes:
            p.append(f"link {lid}: unknown endpoint")
            continue
        outs, ins = nodes[o].get("outputs", []), nodes[tgt].get("inputs", [])
        if os_ >= len(outs) or lid not in (outs[os_].get("links") or []):
            p.append(f"link {lid}: origin node {o} slot {os_} does not list it")
        elif not types_match(outs[os_]["type"], typ):
            p.append(f"link {lid}: type {typ} but the origin slot is {outs[os_]['type']}")
        if ts >= len(ins) or ins[ts].get("link") != lid:
            p.append(f"link {lid}: target node {tgt} slot {ts} does not point back to it")
        elif not types_match(typ, ins[ts]["type"]):
            p.append(f"link {lid}: {typ} into an input of type {ins[ts]['type']}")
    return p


def _check_ui_node(node: dict, info: dict, links: dict) -> list[str]:
    p = []
    slots = widget_slots(info)
    values = node.get("widgets_values", [])
    if len(values) != len(slots):
        return [f"{len(values)} widgets_values for {len(slots)} widget slots {slots}"]
    specs = {name: spec for _, name, spec in ordered_inputs(info)}
    for (name, role), value in zip(slots, values):
        if role == "control" and value not in CONTROL_VALUES:
            p.append(f"{name}: control_after_generate value {value!r} not in {sorted(CONTROL_VALUES)}")
        elif role == "upload" and value != "image":
            p.append(f"{name}: the upload widget's value must be 'image'")
        elif role == "value":
            err = check_value(specs[name], value, name)
            if err:
                p.append(err)
    declared = {i["name"]: i for i in node.get("inputs", [])}
    for sec, name, spec in ordered_inputs(info):
        if is_widget(spec):
            continue
        slot = declared.get(name)
        if slot is None:
            p.append(f"socket input {name} missing from the node's inputs")
        elif not types_match(slot.get("type"), input_type(spec)):
            p.append(f"input {name} declared as {slot.get('type')}, defined as {input_type(spec)}")
        elif sec == "required" and slot.get("link") is None and node.get("mode", 0) == 0:
            p.append(f"required input {name} is not linked")
    for i, out in enumerate(node.get("outputs", [])):
        if i >= len(info["output"]) or not types_match(out.get("type"), info["output"][i]):
            p.append(f"output {i} ({out.get('type')}) does not match the definition {info['output']}")
    for m in node.get("properties", {}).get("models", []):
        p += _check_model_entry(m, node, info)
    return p


def _check_model_entry(m: dict, node: dict, info: dict) -> list[str]:
    p = []
    if set(m) != {"name", "url", "directory"}:
        p.append(f"properties.models entry {m} must have exactly name, url, directory")
        return p
    if m["directory"] not in MODEL_FOLDERS:
        p.append(f"model directory {m['directory']!r} not in {sorted(MODEL_FOLDERS)}")
    if not (m["url"].startswith("https://") and m["url"].split("?")[0].endswith("/" + m["name"])):
        p.append(f"model url {m['url']} must be https and end with /{m['name']}")
    if m["name"] not in node.get("widgets_values", []):
        p.append(f"model {m['name']} is not the file the node's widget picks")
    return p


def ui_to_api(wf: dict, info: dict) -> dict:
    """The frontend's "Export (API)": widgets become named inputs, links become [source id, output index]."""
    links = {link[0]: link for link in wf["links"]}
    api = {}
    for node in sorted(wf["nodes"], key=lambda n: n["id"]):
        if node.get("mode", 0) != 0:
            continue
        d = info[node["type"]]
        inputs = {}
        values = iter(node.get("widgets_values", []))
        for name, role in widget_slots(d):
            v = next(values)
            if role == "value":
                inputs[name] = v
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, origin, oslot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(origin), oslot]
        title = node.get("title") or d["display_name"]
        api[str(node["id"])] = {"inputs": inputs, "class_type": node["type"], "_meta": {"title": title}}
    return api


# ----------------------------------------------------------------------------------------------- API workflows
def check_api_workflow(api: dict, info: dict) -> list[str]:
    p = []
    for nid, node in api.items():
        t = node.get("class_type")
        where = f"node {nid} ({t})"
        if t not in info:
            p.append(f"{where}: unknown class_type")
            continue
        d = info[t]
        specs = {name: (sec, spec) for sec, name, spec in ordered_inputs(d)}
        for name in node.get("inputs", {}):
            if name not in specs:
                p.append(f"{where}: unknown input {name}")
        for name, (sec, spec) in specs.items():
            if name not in node.get("inputs", {}):
                if sec == "required":
                    p.append(f"{where}: required input {name} missing")
                continue
            val = node["inputs"][name]
            if isinstance(val, list):
                if len(val) != 2 or str(val[0]) not in api:
                    p.append(f"{where}: {name} links to a missing node {val}")
                    continue
                src = api[str(val[0])]
                outs = info.get(src["class_type"], {}).get("output", [])
                if not isinstance(val[1], int) or val[1] >= len(outs):
                    p.append(f"{where}: {name} links to a missing output {val}")
                elif not types_match(outs[val[1]], input_type(spec)):
                    p.append(f"{where}: {name} gets {outs[val[1]]}, needs {input_type(spec)}")
            else:
                err = check_value(spec, val, name)
                if err:
                    p.append(f"{where}: {err}")
    return p


def topological_order(api: dict) -> list[str]:
    deps = {nid: {str(v[0]) for v in n["inputs"].values() if isinstance(v, list)} for nid, n in api.items()}
    order, ready = [], deque(sorted(n for n, d in deps.items() if not d))
    users = {n: [m for m, d in deps.items() if n in d] for n in deps}
    remaining = {n: set(d) for n, d in deps.items()}
    while ready:
        n = ready.popleft()
        order.append(n)
        for m in users[n]:
            remaining[m].discard(n)
            if not remaining[m] and m not in order and m not in ready:
                ready.append(m)
    if len(order) != len(api):
        raise ValueError("the API graph has a cycle")
    return order


def run_api_workflow(api: dict, mappings: dict, overrides: dict | None = None) -> dict:
    """Execute an API graph in-process, in dependency order, like ComfyUI's executor (one process, no cache).

    overrides: {input name: value} applied to every node that has that literal input (e.g. small sizes for
    tiny checkpoints). Returns {node id: {"result": tuple, "ui": dict}}."""
    classes = {**NATIVE_STANDINS, **mappings}
    done = {}
    for nid in topological_order(api):
        node = api[nid]
        cls = classes[node["class_type"]]
        kwargs = {}
        for name, val in node["inputs"].items():
            if isinstance(val, list):
                kwargs[name] = done[str(val[0])]["result"][val[1]]
            else:
                kwargs[name] = (overrides or {}).get(name, val)
        hidden = cls.INPUT_TYPES().get("hidden", {})
        if "unique_id" in hidden:
            kwargs["unique_id"] = nid
        out = getattr(cls(), cls.FUNCTION)(**kwargs)
        if isinstance(out, dict):
            done[nid] = {"result": tuple(out.get("result", ())), "ui": out.get("ui", {})}
        else:
            done[nid] = {"result": tuple(out), "ui": {}}
    return done


# ------------------------------------------------------------------------------- native nodes: specs + stand-ins
class _LoadImage:
    """Stand-in for native LoadImage: same definition (nodes.py), images come from IMAGES or a seeded pattern."""
    IMAGES: dict = {}
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"
    CATEGORY = "image"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": (sorted(cls.IMAGES), {"image_upload": True})}}

    def load_image(self, image):
        import torch

        if image in self.IMAGES:
            img = self.IMAGES[image]
        else:
            g = torch.Generator().manual_seed(sum(map(ord, image)))
            img = torch.rand(1, 96, 80, 3, generator=g)
        return img, torch.zeros(img.shape[:3])


class _SaveImage:
    """Stand-in for native SaveImage: checks the IMAGE convention and keeps the images (no files)."""
    SAVED: list = []
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE", {"tooltip": "The images to save."}),
                             "filename_prefix": ("STRING", {"default": "ComfyUI"})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        import torch

        assert isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[-1] == 3, images.shape
        assert images.dtype == torch.float32 and 0.0 <= float(images.min()) and float(images.max()) <= 1.0
        assert not math.isnan(float(images.sum()))
        self.SAVED.append((filename_prefix, images))
        return {"ui": {"images": [{"filename": f"{filename_prefix}_{len(self.SAVED):05}_.png", "subfolder": "",
                                   "type": "output"}]}, "result": (images,)}


class _PreviewImage(_SaveImage):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        return super().save_images(images, "preview")


NATIVE_STANDINS = {"LoadImage": _LoadImage, "SaveImage": _SaveImage, "PreviewImage": _PreviewImage}
NATIVE_DISPLAY = {"LoadImage": "Load Image", "SaveImage": "Save Image", "PreviewImage": "Preview Image"}


def load_workflows(folder: Path) -> dict[str, tuple[dict, dict]]:
    """{name: (ui workflow, api workflow)} for every workflows/*.json and its workflows/api/ twin."""
    out = {}
    for ui_path in sorted(Path(folder).glob("*.json")):
        api_path = ui_path.parent / "api" / ui_path.name
        out[ui_path.stem] = (json.loads(ui_path.read_text()),
                             json.loads(api_path.read_text()) if api_path.is_file() else None)
    return out
