"""Screenshots of the shipped workflows open in ComfyUI's editor, for the README (docs/images/).

Needs a running ComfyUI with this pack (and a checkpoint named v1-5-pruned-emaonly.safetensors, so the
widgets show no missing value), Chromium, and the `playwright` Python package (no browser download:
it drives the system Chromium):

    python main.py --cpu --port 8199            # in ComfyUI, with DreamLoom in custom_nodes
    pip install playwright                      # or any venv that has it
    python tools/screenshots.py --url http://127.0.0.1:8199 --chromium /usr/bin/chromium
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["fabric_dreambooth_lora", "fabric_textual_inversion", "fabric_explore", "fabric_morph"]
# The explore workflow is tall: a taller page keeps the zoom above the editor's low-detail threshold.
HEIGHTS = {"fabric_explore": 3000}
WIDTH, HEIGHT = 1920, 1080


def fit_view(ui: dict, width: int, height: int, margin: int = 40) -> dict:
    """Set the stored canvas scale/offset so the whole graph fits the viewport."""
    xs0 = [n["pos"][0] for n in ui["nodes"]]
    ys0 = [n["pos"][1] - 30 for n in ui["nodes"]]
    xs1 = [n["pos"][0] + n["size"][0] for n in ui["nodes"]]
    ys1 = [n["pos"][1] + n["size"][1] for n in ui["nodes"]]
    w, h = max(xs1) - min(xs0), max(ys1) - min(ys0)
    scale = 0.88 * min(
        (width - 2 * margin) / w, (height - 2 * margin) / h, 1.0
    )  # rendered nodes are larger than their stored size
    ui = json.loads(json.dumps(ui))
    ui["extra"]["ds"] = {"scale": scale, "offset": [margin / scale - min(xs0), margin / scale - min(ys0)]}
    return ui


def main() -> None:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8188")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=args.chromium,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
        page.goto(args.url)
        page.wait_for_function("() => window.app && window.app.graph", timeout=120_000)
        page.wait_for_timeout(3000)
        page.keyboard.press("Escape")  # the first-run template dialog
        # Draw node text even when zoomed out to fit a large graph.
        page.evaluate("""() => {
            const c = window.app.canvas;
            for (const k of ['low_quality_zoom_threshold', 'low_quality_rendering_threshold']) if (k in c) c[k] = 0.05;
            try {
                window.app.extensionManager.setting.set('LiteGraph.Canvas.LowQualityRenderingZoomThreshold', 0.05);
            } catch (e) {}
        }""")
        for name in NAMES:
            height = HEIGHTS.get(name, HEIGHT)
            page.set_viewport_size({"width": WIDTH, "height": height})
            page.wait_for_timeout(500)
            ui = fit_view(json.loads((ROOT / "workflows" / f"{name}.json").read_text()), WIDTH, height - 120)
            page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", ui)
            page.wait_for_timeout(2500)
            for _ in range(2):
                if page.locator(".p-dialog").count():
                    page.keyboard.press("Escape")
                    page.wait_for_timeout(500)
            page.screenshot(path=str(out / f"{name}.png"))
            print(f"wrote {out / (name + '.png')}")
        browser.close()


if __name__ == "__main__":
    main()
