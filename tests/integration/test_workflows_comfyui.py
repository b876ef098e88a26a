"""Each shipped workflow's API twin runs in a real ComfyUI.

* Unchanged, on the built-in tiny-fabric (the loader's default), in a fresh ComfyUI that has no checkpoint file
  at all: the whole graph on any machine. Each run's wall time goes to build/workflow_times.json.
* With only the loader's ckpt_name changed to a random-weight SD1.5 file (plus step and size reductions, 64 px,
  so that it finishes on a CPU): SD1.5 is one widget away.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file

from .comfy_server import ROOT, ComfyServer, comfyui_path
from .conftest import CKPT

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

if comfyui_path() is None:
    pytest.skip(
        "COMFYUI_PATH is not set to a ComfyUI checkout: ComfyUI workflow tests skipped", allow_module_level=True
    )

from trainer.pictures.grid import LINE_HEIGHT, PAD  # noqa: E402

TWINS = Path(__file__).resolve().parents[1] / "workflows"
NAMES = ["fabric_dreambooth_lora", "fabric_textual_inversion", "fabric_explore", "fabric_morph"]
TRAINING_NODES = ("DreamLoomGenerateClassImages", "DreamLoomTrainLoRA", "DreamLoomTrainTextualInversion")
TINY_FABRIC = "tiny-fabric (built-in 128 px fabric model)"
# What ComfyUI logs when a LoRA or an embedding does not fit the model it is applied to, or when anything raised.
LOG_PROBLEMS = ("lora key not loaded", "embedding will be ignored", "traceback")
# SaveImage prefix -> (columns, rows) of the comparison grid it saves
GRIDS = {
    "fabric_dreambooth_lora": {"dreamloom/fabric_contexts": (3, 3)},
    "fabric_textual_inversion": {"dreamloom/fabric_ti_contexts": (3, 3)},
    "fabric_explore": {
        "dreamloom/fabric_guidance": (5, 1),
        "dreamloom/fabric_styles": (3, 3),
        "dreamloom/fabric_seeds": (3, 3),
    },
}
TIMES_FILE = ROOT / "build" / "workflow_times.json"
_times: dict[str, dict] = {}


def _load(name: str) -> dict:
    return json.loads((TWINS / f"{name}.api.json").read_text())


def _nodes(api: dict, class_type: str) -> list[dict]:
    return [n for n in api.values() if n["class_type"] == class_type]


def _saved(server, entry, class_type, api) -> dict[str, Path]:
    """{filename_prefix: file} of the images the nodes of `class_type` saved (PreviewImage: prefix = node id)."""
    files = {}
    for node_id, out in entry["outputs"].items():
        node = api[node_id]
        if node["class_type"] == class_type:
            for img in out.get("images", []):
                key = node["inputs"].get("filename_prefix", node_id)
                files[key] = server.base / img.get("type", "output") / img["subfolder"] / img["filename"]
    return files


def _published(server, folder: str, name: str) -> Path | None:
    """The newest file a training node published as `name` (a `_v2`... suffix if another file had the name)."""
    files = sorted((server.base / "models" / folder).glob(f"{name}*.safetensors"), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


def _log_problems(log: str) -> list[str]:
    return [line for line in log.splitlines() if any(p in line.lower() for p in LOG_PROBLEMS)]


def _check_grid(path: Path, columns: int, rows: int, tile: int) -> None:
    """Image Grid's geometry: `columns` x `rows` PAD-bordered tiles of `tile` px, captions and a title of at most
    four lines each."""
    with Image.open(path) as im:
        width, height = im.size
    assert width == columns * (tile + PAD) + PAD, (path.name, im.size)
    text = 4 * LINE_HEIGHT + 8
    assert rows * (tile + PAD) + PAD < height <= rows * (tile + text + PAD) + text + PAD, (path.name, im.size)


def _check_outputs(server, entry, api, name: str, tile: int, frames: int) -> None:
    saved = _saved(server, entry, "SaveImage", api)
    assert set(saved) == set(GRIDS.get(name, {})), saved
    for prefix, (columns, rows) in GRIDS.get(name, {}).items():
        assert saved[prefix].exists()
        _check_grid(saved[prefix], columns, rows, tile)
    if name == "fabric_morph":
        (gif,) = _saved(server, entry, "DreamLoomSaveAnimation", api).values()
        with Image.open(gif) as im:
            assert (im.n_frames, im.size, im.info["loop"]) == (frames, (tile, tile), 0)
            if frames == 450:  # 30 fps: exactly 15 s
                total = 0
                for i in range(im.n_frames):
                    im.seek(i)
                    total += im.info["duration"]
                assert abs(total - 15000) <= 10, total
    for train in _nodes(api, "DreamLoomTrainLoRA"):
        assert _published(server, "loras", train["inputs"]["output_name"])
        previews = _saved(server, entry, "PreviewImage", api)
        assert len(previews) >= 2 and all(p.exists() for p in previews.values())  # training images and loss
    if name == "fabric_textual_inversion":
        assert _published(server, "embeddings", "sks_fabric_ti")


class _LoadSampler:
    """The 1-minute load average every 10 s while a workflow runs (other work on the machine slows it down)."""

    def __enter__(self):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(10):
                return

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _record(
    name: str, wall: float, load_before, entry, times_dir: Path, load_samples: list[float], model: str = ""
) -> None:
    """Print the run's wall time and keep it in pytest's temp dir and build/workflow_times.json."""
    stamps = {m[0]: m[1].get("timestamp") for m in entry["status"].get("messages", [])}
    executed = None
    if stamps.get("execution_start") and stamps.get("execution_success"):
        executed = round((stamps["execution_success"] - stamps["execution_start"]) / 1000.0, 1)
    _times[name] = {
        "wall_s": round(wall, 1),
        "comfyui_execution_s": executed,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "loadavg_1min_during": {
            "mean": round(sum(load_samples) / len(load_samples), 2),
            "max": round(max(load_samples), 2),
        },
        "cpu_count": os.cpu_count(),
        # under `make test`'s xdist workers ComfyUI inherits one thread (tests/conftest.py): slower than a user's
        "omp_threads": os.environ.get("OMP_NUM_THREADS", "torch default"),
        "machine": platform.platform(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": model or "tiny-fabric (unchanged workflow)",
    }
    print(
        f"\n{name}: {wall:.1f} s wall on {os.cpu_count()} CPUs; 1-min load average during the run: mean "
        f"{_times[name]['loadavg_1min_during']['mean']}, max {_times[name]['loadavg_1min_during']['max']}"
    )
    (times_dir / "workflow_times.json").write_text(json.dumps(_times, indent=2) + "\n")
    previous = json.loads(TIMES_FILE.read_text()) if TIMES_FILE.exists() else {}
    TIMES_FILE.parent.mkdir(parents=True, exist_ok=True)
    TIMES_FILE.write_text(json.dumps({**previous, **_times}, indent=2) + "\n")


@pytest.fixture(scope="module")
def times_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("workflow_times")


@pytest.fixture
def bare_server(tmp_path):
    """A fresh ComfyUI with no checkpoint, LoRA or embedding files and an empty output folder (no caches)."""
    srv = ComfyServer(tmp_path / "comfy").start()
    yield srv
    srv.stop()


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name", NAMES)
def test_workflow_runs_unchanged_on_tiny_fabric(bare_server, times_dir, name):
    api = _load(name)
    (loader,) = _nodes(api, "DreamLoomLoadCheckpoint")
    assert loader["inputs"]["ckpt_name"] == TINY_FABRIC
    entry = _run_timed(bare_server, api, name, times_dir)
    _check_outputs(bare_server, entry, api, name, tile=128, frames=450)


def _run_timed(server, api: dict, name: str, times_dir: Path, model: str = "") -> dict:
    """Queue `api`, wait for success and record its wall time; the server log from here on has no problems
    (ComfyUI's start-up before may warn about its own nodes)."""
    log_start = len(server.log_text())
    load_before = os.getloadavg()
    with _LoadSampler() as load:
        start = time.monotonic()
        entry = server.wait(server.queue_prompt(api), timeout=3500)
        wall = time.monotonic() - start
    log = server.log_text()[log_start:]
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:] + "\n" + log[-3000:]
    _record(name, wall, load_before, entry, times_dir, load.samples, model)
    assert _log_problems(log) == [], log[-5000:]
    return entry


@pytest.mark.timeout(3600)
def test_morph_reuses_the_lora_workflows_result_and_explore_trains_its_own(bare_server, times_dir):
    """The order the README suggests, in one ComfyUI: the LoRA workflow trains, then morph (the same training chain,
    the same inputs) gets its finished LoRA at once and only renders; explore trains its own LoRA without class
    images (one new run, no class-image run)."""
    _run_timed(bare_server, _load("fabric_dreambooth_lora"), "fabric_dreambooth_lora (first of three)", times_dir)
    runs = bare_server.base / "output" / "dreamloom" / "runs"
    trained = sorted(p.name for p in runs.iterdir())
    api = _load("fabric_morph")
    label = "fabric_morph (after the LoRA workflow)"
    entry = _run_timed(bare_server, api, label, times_dir, "tiny-fabric, reused LoRA")
    _check_outputs(bare_server, entry, api, "fabric_morph", tile=128, frames=450)
    assert sorted(p.name for p in runs.iterdir()) == trained, "a second training run was started"
    api = _load("fabric_explore")
    entry = _run_timed(bare_server, api, "fabric_explore (after the LoRA workflow)", times_dir)
    _check_outputs(bare_server, entry, api, "fabric_explore", tile=128, frames=450)
    new_runs = sorted(set(p.name for p in runs.iterdir()) - set(trained))
    assert len(new_runs) == 1 and new_runs[0].startswith("sks_fabric_explore-"), new_runs


def one_widget_sd15(api: dict) -> dict:
    """The loader's ckpt_name set to the SD1.5 file; the rest only made small and short enough for a CPU."""
    api = json.loads(json.dumps(api))
    for node in api.values():
        ct, i = node["class_type"], node["inputs"]
        if ct == "DreamLoomLoadCheckpoint":
            i["ckpt_name"] = CKPT  # the one widget
        elif ct == "DreamLoomLoadTrainingImages":
            i["resolution"] = 64
        elif ct == "DreamLoomGenerateClassImages":
            i.update(count=2, resolution=64, steps=1)
        elif ct == "DreamLoomTrainLoRA":
            i.update(max_train_steps=2, num_class_images=2, sample_every=0, learning_rate=1e-2)
        elif ct == "DreamLoomTrainTextualInversion":
            i.update(max_train_steps=2, sample_every=0, learning_rate=0.05)
        elif ct == "DreamLoomEmptyLatent":
            i.update(width=64, height=64)
        elif ct in ("KSampler", "BasicScheduler"):
            i["steps"] = 1
        elif ct == "DreamLoomSlerpNoise":
            i.update(width=64, height=64, frames_per_transition=min(i["frames_per_transition"], 2))
    return api


@pytest.mark.parametrize("name", NAMES)
def test_workflow_runs_on_sd15_by_changing_one_widget(server, name):
    api = one_widget_sd15(_load(name))
    for node in api.values():  # the training nodes' own ckpt_name still says tiny-fabric: base_model overrides it
        if node["class_type"] in TRAINING_NODES:
            assert node["inputs"]["ckpt_name"] == TINY_FABRIC and node["inputs"]["base_model"][1] == 3
    log_start = len(server.log_text())
    entry = server.wait(server.queue_prompt(api), timeout=1800)
    log = server.log_text()[log_start:]
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:] + "\n" + log[-3000:]
    assert _log_problems(log) == [], log[-5000:]
    _check_outputs(server, entry, api, name, tile=64, frames=10)  # morph: 5 keyframes x 2 frames
    # what was trained belongs to SD1.5 (768-wide text embeddings, 320-channel UNet blocks), not to tiny-fabric
    if name == "fabric_textual_inversion":
        emb = load_file(_published(server, "embeddings", "sks_fabric_ti"))
        assert {t.shape[-1] for t in emb.values()} == {768}
    if name == "fabric_dreambooth_lora":
        lora = load_file(_published(server, "loras", "sks_fabric"))
        assert any(320 in t.shape for t in lora.values())
