"""The ComfyUI page in headless Debian chromium (skipped unless COMFYUI_DIR is set and chromium is installed).

Opens the real frontend served by a real ComfyUI with the pack installed, checks that our three JS extensions
registered, loads every shipped UI workflow and finds our nodes rendered (known node types, every link in place,
widgets as saved), exercises each extension (the size warning, snapping to the reference image, the badge after
a run queued from the page), asserts that the console stayed free of errors, and saves docs/screenshot.png.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest

from comfy_harness import load_workflows
from comfy_server import Browser, ComfyServer, cleanup, png_bytes, prepare_base

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run"),
              pytest.mark.skipif(not CHROMIUM, reason="needs Debian's chromium (apt-get install chromium)")]
ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = load_workflows(ROOT / "workflows")
EXTENSIONS = ["FluxCore.Badge", "FluxCore.SizeWarning", "FluxCore.SnapToReference"]
SCREENSHOT = Path(os.environ.get("FLUXCORE_SCREENSHOT", ROOT / "docs" / "screenshot.png"))
# What ComfyUI's frontend (1.47) itself logs on a fresh profile, with or without this pack installed (checked by
# starting the page with an empty custom_nodes/): probes for optional user files, and one early getter warning.
FRONTEND_STARTUP_NOISE = ("console.error: ComfyApp graph accessed before initialization", "/user.css",
                          "/api/userdata")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_browser")
    prepare_base(base)
    srv = ComfyServer(Path(COMFYUI_DIR), base).start()
    browser = None
    try:
        srv.upload_image("fluxcore_reference.png", png_bytes(200, 150, 1))
        srv.upload_image("fluxcore_reference_2.png", png_bytes(128, 192, 2))
        # no first-run template browser over the canvas, no minimap over the screenshot
        srv.post("/settings", {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False})
        browser = Browser(CHROMIUM, base / "chromium-profile", 1920, 1080)
        browser.navigate(srv.url)
        browser.wait_for("window.app?.isGraphReady && window.app.extensions?.length > 0", timeout=120)
        browser.wait_for(f"{json.dumps(EXTENSIONS)}.every(n => app.extensions.some(e => e.name === n))", 60)
        startup = browser.console_errors()
        assert [e for e in startup if not any(k in e for k in FRONTEND_STARTUP_NOISE)] == [], startup
        browser.events.clear()
        browser.server = srv
        yield browser
    finally:
        if browser is not None:
            browser.close()
        srv.stop()
        cleanup(base)


def load(page, name: str) -> dict:
    """Load a UI workflow the way drag-and-drop does, and report what the page made of it."""
    wf = WORKFLOWS[name][0]
    page.evaluate(f"app.loadGraphData({json.dumps(wf)}, true, true, {json.dumps(name)})")
    page.wait_for(f"app.graph.nodes.length === {len(wf['nodes'])}", 30)
    return page.evaluate("""(() => app.graph.nodes.map(n => ({
        id: n.id, type: n.type, known: !!n.constructor.nodeData, comfyClass: n.comfyClass ?? null,
        links: (n.inputs ?? []).filter(i => i.link != null).length,
        widgets: (n.widgets ?? []).map(w => [w.name, w.value]),
        badges: Object.keys(n.__fluxcoreBadges ?? {})})))()""")


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_loads_with_our_nodes_rendered(page, name):
    wf = WORKFLOWS[name][0]
    nodes = {str(n["id"]): n for n in load(page, name)}  # the frontend may hand ids back as strings
    assert len(nodes) == len(wf["nodes"])
    for saved in wf["nodes"]:
        live = nodes[str(saved["id"])]
        assert live["type"] == saved["type"] and live["known"], f"{saved['type']} is not a registered node"
        assert live["links"] == sum(1 for i in saved["inputs"] if i.get("link") is not None)
        values = [v for _, v in live["widgets"] if v is not None]
        for v in saved["widgets_values"]:
            if v not in ("randomize", "image"):  # the control/upload entries are widgets of their own
                assert v in values, (saved["type"], v, live["widgets"])
    assert page.evaluate("Object.keys(app.graph.links ?? {}).length || app.graph.links?.size || 0") == len(wf["links"])
    assert page.console_errors() == []


def test_size_warning_badge(page):
    load(page, "fluxcore_klein_text_to_image")
    js = "app.graph.nodes.find(n => n.type === 'FluxCoreSampler')"
    assert page.evaluate(f"{js}.__fluxcoreSizeWarning") is None
    # the number widget snaps typed values to its step of 16; a workflow saved elsewhere need not be snapped
    wf = copy.deepcopy(WORKFLOWS["fluxcore_klein_text_to_image"][0])
    sampler = next(n for n in wf["nodes"] if n["type"] == "FluxCoreSampler")
    sampler["widgets_values"][4] = 1000
    page.evaluate(f"app.loadGraphData({json.dumps(wf)}, true, true, 'size-warning')")
    page.wait_for(f"{js}?.widgets.find(w => w.name === 'width').value === 1000", 30)
    warning = page.wait_for(f"{js}.__fluxcoreSizeWarning", 10)
    assert "width 1000" in warning
    assert page.evaluate(f"{js}.badges.some(b => b().text.includes('multiple of 16'))")
    page.evaluate(f"(() => {{ const n = {js}; const w = n.widgets.find(w => w.name === 'width');"
                  "w.value = 1008; w.callback?.(1008); })()")
    assert page.evaluate(f"{js}.__fluxcoreSizeWarning") is None
    assert page.console_errors() == []


def test_snap_to_reference_and_badges_after_a_run(page):
    load(page, "fluxcore_klein_edit")
    sampler = "app.graph.nodes.find(n => n.type === 'FluxCoreSampler')"
    page.wait_for("app.graph.nodes.find(n => n.type === 'LoadImage')?.imgs?.[0]?.naturalWidth > 0", 30)
    items = page.evaluate(f"app.collectNodeMenuItems({sampler}).map(i => i.content)")
    assert "FluxCore: snap width/height to the reference image" in items
    page.evaluate(f"app.collectNodeMenuItems({sampler}).find(i => i.content.includes('snap')).callback()")
    size = page.evaluate(f"['width', 'height'].map(k => {sampler}.widgets.find(w => w.name === k).value)")
    assert size == [192, 144]  # 200x150 floored to multiples of 16, as the pipeline prepares the reference
    page.evaluate("app.queuePrompt(0, 1)")  # the page's own Queue button path
    page.wait_for("app.graph.nodes.filter(n => n.type.startsWith('FluxCore'))"
                  ".every(n => n.__fluxcoreBadges?.chosen)", timeout=180)
    badges = page.evaluate("app.graph.nodes.filter(n => n.type.startsWith('FluxCore'))"
                           ".map(n => [n.type, n.__fluxcoreBadges?.chosen?.().text ?? null])")
    for node_type, text in badges:
        assert text and "torch:cpu" in text, (node_type, text)
    assert page.evaluate(f"app.collectNodeMenuItems({sampler}).some(i => i.content.includes('why this'))")
    bottom = fit(page)
    page.screenshot(SCREENSHOT, {"x": 0, "y": 0, "width": 1920, "height": min(1080, bottom + 60)})
    assert SCREENSHOT.stat().st_size > 10_000
    assert page.console_errors() == []


def fit(page, margin: int = 60, max_scale: float = 0.8) -> int:
    """Frame the whole graph at a zoom where the canvas still draws text and badges (above ~0.6); returns the
    graph's bottom edge in page pixels."""
    bottom = page.evaluate(f"""(() => {{
        const ns = app.graph.nodes, c = app.canvas, el = c.canvas;
        const x0 = Math.min(...ns.map(n => n.pos[0])), y0 = Math.min(...ns.map(n => n.pos[1])) - 60;
        const x1 = Math.max(...ns.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...ns.map(n => n.pos[1] + n.size[1]));
        const s = Math.min({max_scale}, (el.clientWidth - 2 * {margin} - 80) / (x1 - x0),
                           (el.clientHeight - 2 * {margin}) / (y1 - y0));
        c.ds.scale = s;
        c.ds.offset = [({margin} + 80) / s - x0, {margin} / s - y0];
        c.setDirty(true, true);
        c.draw(true, true);
        return Math.round(el.getBoundingClientRect().top + ({margin} / s + (y1 - y0)) * s);
    }})()""")
    import time

    time.sleep(1.0)  # let the next animation frame paint
    return int(bottom)
