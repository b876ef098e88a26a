"""Each shipped workflow (workflows/*.json, UI format) loaded into ComfyUI's editor in headless Chromium, made small
in the loaded graph (steps, counts, frames), queued with the editor's Run button, and checked as a user sees it:

* fabric_morph: the DreamLoom Save Animation node shows its GIF (an image that actually loaded).
* every Train DreamBooth LoRA / Train Textual Inversion node: its preview, which grows the node, is not covered by
  another node (node boxes in canvas coordinates after the run).

The model stays the loader's default, the built-in tiny-fabric (tiny-sdxl for the sdxl_* workflows), in a fresh
ComfyUI with no checkpoint file.
A screenshot of each workflow after its run goes to pytest's temp dir and build/screenshots/<name>.png.

Needs COMFYUI_PATH (a ComfyUI checkout; COMFYUI_PYTHON optional), the `playwright` Python package and a Chromium
(CHROMIUM, or /usr/bin/chromium, or `chromium` on PATH); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from .comfy_server import ROOT, ComfyServer, comfyui_path

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

if comfyui_path() is None:
    pytest.skip("COMFYUI_PATH is not set to a ComfyUI checkout: editor browser tests skipped", allow_module_level=True)

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")


def _chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


CHROMIUM = _chromium()
if CHROMIUM is None:
    pytest.skip("no Chromium found (set CHROMIUM or install /usr/bin/chromium)", allow_module_level=True)

WORKFLOWS = ROOT / "workflows"
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
SCREENSHOTS = ROOT / "build" / "screenshots"
WIDTH, HEIGHT = 1600, 1000
TRAINING = ("DreamLoomTrainLoRA", "DreamLoomTrainTextualInversion", "DreamLoomTrainFull")
TINY_FABRIC = "tiny-fabric (built-in 128 px fabric model)"
TINY_SDXL = "tiny-sdxl (built-in 64 px SDXL test model)"
RUN_TIMEOUT = 2400  # a hang guard, not a timing assertion
# Widget values set in the loaded graph, by node type; {"max": n} caps the current value.
SMALL = {
    "DreamLoomGenerateClassImages": {"count": 2, "steps": 2},
    "DreamLoomTrainLoRA": {"max_train_steps": 2, "num_class_images": 2, "sample_every": 1},
    "DreamLoomTrainTextualInversion": {"max_train_steps": 2, "sample_every": 1},
    "DreamLoomTrainFull": {"max_train_steps": 2, "num_class_images": 2, "sample_every": 1},
    "KSampler": {"steps": 2},
    "BasicScheduler": {"steps": 2},
    "DreamLoomSlerpNoise": {"frames_per_transition": {"max": 2}},
}

SHRINK_JS = """(small) => {
    const changed = [];
    for (const node of app.graph._nodes) {
        for (const [name, value] of Object.entries(small[node.type] || {})) {
            const w = (node.widgets || []).find((w) => w.name === name);
            if (!w) throw new Error(`${node.type} #${node.id} has no widget ${name}`);
            w.value = typeof value === 'object' ? Math.min(w.value, value.max) : value;
            changed.push([node.id, node.type, name, w.value]);
        }
    }
    app.graph.setDirtyCanvas(true, true);
    return changed;
}"""

# Boxes [x, y, w, h] in canvas coordinates, title bar included.
BOXES_JS = """() => {
    const titleH = (window.LiteGraph && window.LiteGraph.NODE_TITLE_HEIGHT) || 30;
    return app.graph._nodes.map((n) => {
        const r = n.boundingRect;
        const box = r && r.length === 4 ? Array.from(r) : [n.pos[0], n.pos[1] - titleH, n.size[0], n.size[1] + titleH];
        return {id: n.id, type: n.type, title: n.title, pos: Array.from(n.pos), size: Array.from(n.size), box,
                imgs: (n.imgs || []).length};
    });
}"""

# Fit the whole graph into the canvas element (the part of the page right of the side bar, below the menus).
FIT_VIEW_JS = """() => {
    const margin = 30, titleH = 30;
    const el = app.canvas.canvas;
    const nodes = app.graph._nodes;
    const x0 = Math.min(...nodes.map((n) => n.pos[0])), y0 = Math.min(...nodes.map((n) => n.pos[1] - titleH));
    const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0]));
    const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
    const scale = Math.min((el.clientWidth - 2 * margin) / (x1 - x0), (el.clientHeight - 2 * margin) / (y1 - y0), 1.0);
    const ds = app.canvas.ds;
    ds.scale = scale;
    ds.offset[0] = margin / scale - x0;
    ds.offset[1] = margin / scale - y0;
    app.canvas.setDirty(true, true);
    return scale;
}"""

# What the editor shows for a node: its output entry, its preview images (HTMLImageElements the canvas draws)
# and any <img>/<video> elements in the DOM that show a /view URL for the file.
SHOWN_JS = """(id) => {
    const node = app.graph.getNodeById(id);
    const outputs = app.nodeOutputs || {};
    const out = outputs[String(id)] || outputs[id] || null;
    const imgs = (node.imgs || []).map((i) => ({tag: i.tagName, src: i.src, complete: i.complete,
                                                naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight}));
    const dom = Array.from(document.querySelectorAll('img, video'))
        .filter((e) => (e.currentSrc || e.src || '').includes('/view?'))
        .map((e) => ({tag: e.tagName, src: e.currentSrc || e.src, naturalWidth: e.naturalWidth || e.videoWidth || 0,
                      visible: !!(e.offsetWidth || e.offsetHeight)}));
    return {out, imgs, dom, size: Array.from(node.size)};
}"""


@pytest.fixture(scope="module")
def editor_server(tmp_path_factory):
    """A fresh ComfyUI with this pack and no checkpoint file at all (the workflows run on tiny-fabric)."""
    srv = ComfyServer(tmp_path_factory.mktemp("comfy_editor")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def page(editor_server):
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        pg = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
        errors: list[str] = []
        pg.on("pageerror", lambda err: errors.append(str(err)))
        pg.goto(editor_server.url)
        pg.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=180_000)
        pg.wait_for_timeout(3000)
        _close_dialogs(pg)
        # Full node detail (text) even when zoomed out to fit a large graph, and no minimap over the screenshots.
        pg.evaluate("""async () => {
            const settings = window.app.extensionManager.setting;
            await settings.set('LiteGraph.Canvas.MinFontSizeForLOD', 0);
            await settings.set('Comfy.Minimap.Visible', false);
        }""")
        if errors:
            print(f"\nerrors in the page at start-up: {errors}")
        pg.page_errors = errors
        yield pg
        browser.close()


def _close_dialogs(page) -> None:
    for _ in range(3):
        if not page.locator(".p-dialog").count():
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(500)


def _run_button(page):
    """The main part of the editor's Run split button (its arrow opens the queue-mode menu)."""
    split = page.locator('[data-testid="queue-button"]')
    return split.locator("button").first


def _wait_for_new_prompt(server: ComfyServer, before: set[str], timeout: float) -> tuple[str, dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        queue = server.get("/queue")
        history = server.get("/history") or {}
        new = [pid for pid in history if pid not in before]
        if new and not queue["queue_running"] and not queue["queue_pending"]:
            assert len(new) == 1, new
            return new[0], history[new[0]]
        time.sleep(2)
    raise TimeoutError(f"the queue did not empty in {timeout} s; log tail:\n{server.log_text()[-3000:]}")


def _wait_for_previews(page, ids: list[int], timeout: float = 90) -> dict:
    """{id: what the editor shows} once each node's preview images loaded (or the state at the timeout, in the
    assertion message)."""
    deadline = time.time() + timeout
    while True:
        shown = {i: page.evaluate(SHOWN_JS, i) for i in ids}
        loaded = {
            i: bool(s["imgs"]) and all(im["complete"] and im["naturalWidth"] > 0 for im in s["imgs"])
            for i, s in shown.items()
        }
        if all(loaded.values()):
            return shown
        if time.time() > deadline:
            raise AssertionError(f"preview images not loaded in the editor after {timeout} s: {json.dumps(shown)}")
        page.wait_for_timeout(1000)


def _intersects(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _screenshot(page, name: str, tmp_path: Path) -> list[Path]:
    page.evaluate(FIT_VIEW_JS)
    page.wait_for_timeout(1500)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    paths = [tmp_path / f"{name}.png", SCREENSHOTS / f"{name}.png"]
    page.screenshot(path=str(paths[0]))
    shutil.copyfile(paths[0], paths[1])
    for p in paths:
        print(f"\n{name}: screenshot {p}")
    return paths


@pytest.mark.timeout(RUN_TIMEOUT + 600)
@pytest.mark.parametrize("name", NAMES)
def test_workflow_in_editor(editor_server, page, tmp_path, name):
    server = editor_server
    wf = json.loads((WORKFLOWS / f"{name}.json").read_text())
    errors_before = len(page.page_errors)
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", wf)
    page.wait_for_timeout(1500)
    _close_dialogs(page)
    loaded = {n["id"]: n for n in page.evaluate(BOXES_JS)}
    assert sorted(loaded) == sorted(n["id"] for n in wf["nodes"]), "the editor did not load every node"
    loader = page.evaluate(
        "() => app.graph._nodes.filter((n) => n.type === 'DreamLoomLoadCheckpoint').map((n) => n.widgets[0].value)"
    )
    # one loader per workflow; the full fine-tune's second one loads what it trained (its widget is the default)
    assert loader and set(loader) == {TINY_SDXL if name.startswith("sdxl_") else TINY_FABRIC}, loader
    changed = page.evaluate(SHRINK_JS, SMALL)
    print(f"\n{name}: set in the loaded graph: {changed}")

    before = set(server.get("/history") or {})
    log_start = len(server.log_text())
    button = _run_button(page)
    if button.count() and button.is_visible():
        button.click()
        how = "clicked the Run button ([data-testid=queue-button])"
    else:  # the frontend's own queueing, as the button does
        page.evaluate("() => app.queuePrompt(0)")
        how = "app.queuePrompt(0) (no visible Run button)"
    print(f"{name}: queued with {how}")
    prompt_id, entry = _wait_for_new_prompt(server, before, RUN_TIMEOUT)
    log = server.log_text()[log_start:]
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:] + "\n" + log[-3000:]

    # The editor queued the reduced values (they are what ran).
    prompt = entry["prompt"][2]
    for node_id, node in prompt.items():
        for widget, value in SMALL.get(node["class_type"], {}).items():
            if not isinstance(value, dict):
                assert node["inputs"][widget] == value, (node_id, widget, node["inputs"][widget])

    # Outputs reach the editor over the websocket; the canvas loads a node's preview images when it draws the node:
    # fit the whole graph in view, then wait until every output node's images loaded in the page.
    page.evaluate(FIT_VIEW_JS)
    shown_ids = [int(i) for i, out in entry["outputs"].items() if out.get("images")]
    try:
        _wait_for_previews(page, shown_ids)
    except AssertionError:
        _screenshot(page, name, tmp_path)
        raise
    page.wait_for_timeout(1500)  # a few frames: nodes resize to their previews when drawn

    paths = _screenshot(page, name, tmp_path)
    boxes = page.evaluate(BOXES_JS)

    if name == "fabric_morph":
        (save_id,) = [b["id"] for b in boxes if b["type"] == "DreamLoomSaveAnimation"]
        shown = page.evaluate(SHOWN_JS, save_id)
        print(f"{name}: Save Animation shows {json.dumps(shown)}")
        (saved,) = entry["outputs"][str(save_id)]["images"]
        assert saved["filename"].endswith(".gif"), saved
        elements = [e for e in shown["imgs"] + shown["dom"] if saved["filename"] in e["src"]]
        assert elements, f"Save Animation shows no <img>/<video> for {saved['filename']}: {shown}; see {paths[1]}"
        assert all(e["tag"] == "IMG" and e["naturalWidth"] > 0 for e in elements), (elements, str(paths[1]))

    for node in (b for b in boxes if b["type"] in TRAINING):
        print(f"{name}: {node['type']} #{node['id']} after the run: box {node['box']} (stored size {node['size']})")
        assert node["imgs"], f"{node['type']} #{node['id']} shows no preview: {node}"
        covering = [b for b in boxes if b["id"] != node["id"] and _intersects(node["box"], b["box"])]
        assert not covering, (
            f"{name}: {node['type']} #{node['id']} box {node['box']} (its preview) is covered by "
            f"{[(b['type'], b['id'], b['box']) for b in covering]}; see {paths[1]}"
        )
    if page.page_errors[errors_before:]:
        print(f"{name}: errors in the page: {page.page_errors[errors_before:]}")


def _animation_graph(fmt: str) -> dict:
    """Core Empty Image (6 frames) -> Save Animation (DreamLoom) in `fmt`: the smallest graph with an animation."""
    return {
        "last_node_id": 2,
        "last_link_id": 1,
        "nodes": [
            {
                "id": 1,
                "type": "EmptyImage",
                "pos": [40, 40],
                "size": [300, 130],
                "flags": {},
                "order": 0,
                "mode": 0,
                "inputs": [],
                "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]}],
                "properties": {},
                "widgets_values": [64, 64, 6, 0x2060A0],
            },
            {
                "id": 2,
                "type": "DreamLoomSaveAnimation",
                "pos": [400, 40],
                "size": [360, 420],
                "flags": {},
                "order": 1,
                "mode": 0,
                "inputs": [{"name": "images", "type": "IMAGE", "link": 1}],
                "outputs": [{"name": "path", "type": "STRING", "links": []}],
                "properties": {},
                "widgets_values": [8.0, fmt, True, f"dreamloom/format_{fmt}"],
            },
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"]],
        "groups": [],
        "config": {},
        "extra": {},
        "version": 0.4,
    }


@pytest.mark.parametrize("fmt, tag", [("gif", "IMG"), ("webp", "IMG"), ("mp4", "VIDEO")])
def test_save_animation_shows_every_format(editor_server, page, tmp_path, fmt, tag):
    """Each format Save Animation writes is shown on the node: GIF and WebP as an <img>, MP4 as a <video>."""
    if fmt == "mp4":
        pytest.importorskip("av", reason="MP4 needs PyAV in ComfyUI's environment")
    server = editor_server
    before = set(server.get("/history") or {})
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", _animation_graph(fmt))
    page.wait_for_timeout(1000)
    _close_dialogs(page)
    page.evaluate("() => app.queuePrompt(0)")
    _, entry = _wait_for_new_prompt(server, before, 300)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:]
    (saved,) = entry["outputs"]["2"]["images"]
    assert saved["filename"].endswith(f".{fmt}"), saved
    page.evaluate(FIT_VIEW_JS)
    deadline = time.time() + 60
    while True:
        shown = page.evaluate(SHOWN_JS, 2)
        elements = [e for e in shown["imgs"] + shown["dom"] if saved["filename"] in e["src"]]
        if any(e["tag"] == tag and e["naturalWidth"] > 0 for e in elements) or time.time() > deadline:
            break
        page.wait_for_timeout(1000)
    paths = _screenshot(page, f"save_animation_{fmt}", tmp_path)
    assert any(e["tag"] == tag and e["naturalWidth"] == 64 for e in elements), (
        f"Save Animation ({fmt}) shows no loaded <{tag.lower()}> for {saved['filename']}: {shown}; see {paths[1]}"
    )
