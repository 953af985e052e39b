"""The ComfyUI page in headless Debian chromium (skipped unless COMFYUI_DIR is set and chromium is installed).

Opens the real frontend served by a real ComfyUI with the pack installed, checks that our three JS extensions
registered, loads every shipped UI workflow and finds our nodes rendered (known node types, every link in place,
widgets as saved), exercises each extension (the size warning, snapping to the reference image, the badge after
a run queued from the page), asserts that the console stayed free of errors.

Each workflow is also checked the way a person sees it when opened: every node inside the window and on the canvas
itself (not under the tab bar, the sidebar or the floating toolbars: the page's own elementFromPoint says what is
on top at each corner), and after a run no FluxCore badge wider than its node or over another node's badge. A
screenshot of each as opened, and of the edit workflow after its run, goes to FLUXCORE_SCREENSHOTS (a folder;
default a temporary one). The tracked docs/screenshot*.png are rewritten only with FLUXCORE_UPDATE_DOCS=1.
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
WINDOW = (1920, 1080)
EXTENSIONS = ["FluxCore.Badge", "FluxCore.SizeWarning", "FluxCore.SnapToReference"]
UPDATE_DOCS = os.environ.get("FLUXCORE_UPDATE_DOCS") == "1"
# the screenshots docs/COMFYUI.md shows: {file in docs/: screenshot this test takes}
DOC_SHOTS = {"screenshot.png": "fluxcore_klein_edit_after_run.png",
             "screenshot_klein_text_to_image.png": "fluxcore_klein_text_to_image.png"}
# What ComfyUI's frontend (1.47) itself logs on a fresh profile, with or without this pack installed (checked by
# starting the page with an empty custom_nodes/): probes for optional user files, and one early getter warning.
FRONTEND_STARTUP_NOISE = ("console.error: ComfyApp graph accessed before initialization", "/user.css",
                          "/api/userdata")


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("FLUXCORE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    yield folder
    if UPDATE_DOCS:
        for doc, shot in DOC_SHOTS.items():
            if (folder / shot).is_file():
                shutil.copyfile(folder / shot, ROOT / "docs" / doc)


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
        browser = Browser(CHROMIUM, base / "chromium-profile", *WINDOW)
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
    """Load a UI workflow the way drag-and-drop does (restoring the saved view, if any), wait until the view has
    settled and the images are in, and report what the page made of it."""
    wf = WORKFLOWS[name][0]
    page.evaluate(f"app.loadGraphData({json.dumps(wf)}, true, true, {json.dumps(name)})")
    page.wait_for(f"app.graph.nodes.length === {len(wf['nodes'])}", 30)
    page.wait_for("app.graph.nodes.filter(n => n.type === 'LoadImage').every(n => n.imgs?.[0]?.naturalWidth > 0)",
                  30)
    settle(page)
    return page.evaluate("""(() => app.graph.nodes.map(n => ({
        id: n.id, type: n.type, known: !!n.constructor.nodeData, comfyClass: n.comfyClass ?? null,
        links: (n.inputs ?? []).filter(i => i.link != null).length,
        widgets: (n.widgets ?? []).map(w => [w.name, w.value]),
        badges: Object.keys(n.__fluxcoreBadges ?? {})})))()""")


def settle(page) -> None:
    """Two animation frames: the frontend fits the view one frame after loading, then paints. Toasts left over from an
    earlier test in the same page (e.g. the size warning) are closed first: they float over the canvas for seconds
    and are not part of how a workflow opens."""
    page.evaluate("(document.querySelectorAll('.p-toast-message').forEach(e => e.remove()), true)")
    page.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(true))))")
    page.evaluate("(app.canvas.setDirty(true, true), app.canvas.draw(true, true), true)")


def hidden_corners(page, badges: bool = False) -> list:
    """Corners of node boxes (title included; with badges, the badge row above it too) that the user cannot see:
    outside the window, or where the topmost element is not the canvas (tab bar, sidebar, toolbars)."""
    return page.evaluate(f"""(() => {{
        const c = app.canvas, el = c.canvas, r = el.getBoundingClientRect(), s = c.ds.scale, o = c.ds.offset;
        const badgeRow = {'true' if badges else 'false'} ? 24 : 0, out = [];
        for (const n of app.graph.nodes) {{
            const [x, y, w, h] = n.boundingRect;
            const x0 = r.left + (x + o[0]) * s + 2, x1 = r.left + (x + w + o[0]) * s - 2;
            const y0 = r.top + (y - badgeRow + o[1]) * s + 2, y1 = r.top + (y + h + o[1]) * s - 2;
            for (const [px, py] of [[x0, y0], [x1, y0], [x0, y1], [x1, y1]]) {{
                const top = document.elementFromPoint(px, py);
                if (top !== el) out.push([n.type, Math.round(px), Math.round(py),
                                          top ? top.tagName + '.' + String(top.className).slice(0, 40) : 'outside']);
            }}
        }}
        return out;
    }})()""")


def badge_overlaps(page) -> list:
    """Our badges (as last drawn, in graph units) that stick out of their node's width or cross another node's
    badges or box."""
    return page.evaluate("""(() => {
        const boxes = [], out = [];
        for (const n of app.graph.nodes) {
            const [x, y, w, h] = n.boundingRect;
            boxes.push({n, kind: 'node', r: [x, y, w, h]});
            for (const g of Object.values(n.__fluxcoreBadges ?? {})) {
                const b = g.badge, [bx, by, bw, bh] = b._boundingRect;
                if (!b.text || !bw) continue;
                const r = [n.pos[0] + bx, n.pos[1] + by, bw, bh];
                if (r[0] < x - 0.5 || r[0] + r[2] > x + w + 0.5) out.push([n.type, b.text, 'wider than its node']);
                boxes.push({n, kind: 'badge', text: b.text, r});
            }
        }
        const cross = (a, b) => a[0] < b[0] + b[2] && b[0] < a[0] + a[2] && a[1] < b[1] + b[3] && b[1] < a[1] + a[3];
        for (const a of boxes.filter(b => b.kind === 'badge'))
            for (const b of boxes)
                if (b.n !== a.n && cross(a.r, b.r)) out.push([a.n.type, a.text, 'over ' + b.n.type + ' ' + b.kind]);
        return out;
    })()""")


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_loads_with_our_nodes_rendered(page, shots, name):
    wf = WORKFLOWS[name][0]
    nodes = {str(n["id"]): n for n in load(page, name)}  # the frontend may hand ids back as strings
    page.screenshot(shots / f"{name}.png")
    assert hidden_corners(page) == [], "the workflow does not open framed in the window"
    assert not page.evaluate("app.canvas.low_quality"), "opened so small that the canvas drops text and badges"
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


def test_snap_to_reference_and_badges_after_a_run(page, shots):
    load(page, "fluxcore_klein_edit")
    sampler = "app.graph.nodes.find(n => n.type === 'FluxCoreSampler')"
    items = page.evaluate(f"app.collectNodeMenuItems({sampler}).map(i => i.content)")
    assert "FluxCore: snap width/height to the reference image" in items
    page.evaluate(f"app.collectNodeMenuItems({sampler}).find(i => i.content.includes('snap')).callback()")
    size = page.evaluate(f"['width', 'height'].map(k => {sampler}.widgets.find(w => w.name === k).value)")
    assert size == [192, 144]  # 200x150 floored to multiples of 16, as the pipeline prepares the reference
    page.evaluate("app.queuePrompt(0, 1)")  # the page's own Queue button path
    page.wait_for("app.graph.nodes.filter(n => n.type.startsWith('FluxCore'))"
                  ".every(n => n.__fluxcoreBadges?.chosen)", timeout=180)
    page.wait_for("app.graph.nodes.find(n => n.type === 'SaveImage')?.imgs?.[0]?.naturalWidth > 0", 60)
    badges = page.evaluate("app.graph.nodes.filter(n => n.type.startsWith('FluxCore'))"
                           ".map(n => [n.type, n.__fluxcoreBadges?.chosen?.().text ?? null])")
    for node_type, text in badges:
        assert text and "torch:cpu" in text, (node_type, text)
    assert page.evaluate(f"app.collectNodeMenuItems({sampler}).some(i => i.content.includes('why this'))")
    settle(page)
    page.screenshot(shots / "fluxcore_klein_edit_after_run.png")
    assert badge_overlaps(page) == []
    assert hidden_corners(page, badges=True) == []
    # the sampler's badge is fitted to its node; the full text stays with the node (its menu entry shows it)
    full = page.evaluate(f"{sampler}.__fluxcoreInfo.badge")
    assert "192x144" in full and page.evaluate(f"{sampler}.__fluxcoreBadges.chosen().text").startswith("torch:cpu")
    assert page.console_errors() == []
