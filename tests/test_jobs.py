import os
import signal

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from trainer.errors import DreamLoomError
from trainer.jobs.parent import JobInterrupted, RunLock, finished_outputs, folder_fingerprint, prepare_run_dir, run_job


def _train_request(fabric_dir, **kw):
    cfg = tiny_config(fabric_dir, **{"max_train_steps": 8, "checkpoint_every": 2, "sample_every": 4, **kw}).validate()
    return {"kind": "train", "config": cfg.to_dict()}


def _run_dir(tmp_path, fabric_dir, **kw):
    req = _train_request(fabric_dir, **kw)
    req["cache_root"] = str(tmp_path / "cache")
    return prepare_run_dir(tmp_path / "runs", req, {"data": folder_fingerprint(fabric_dir)})


@pytest.mark.slow
def test_job_runs_reports_progress_in_order_and_is_reused(fabric_dir, tmp_path):
    run_dir = _run_dir(tmp_path, fabric_dir)
    seen = []
    outputs = run_job(run_dir, on_event=seen.append)
    steps = [e["step"] for e in seen if e["event"] == "progress" and e.get("phase") == "training"]
    assert steps == sorted(steps) and steps[-1] == 8
    kinds = [e["event"] for e in seen]
    assert kinds[-1] == "done" and "sample" in kinds and "checkpoint" in kinds
    log = (run_dir / "log.txt").read_text()
    for line in ("progress: phase=training", "sample: step=0", "checkpoint: step=2", "done: "):
        assert line in log, line  # the run's story, not only "worker started"
    assert log.count("progress: phase=training") == 1  # routine progress is not logged step by step
    assert load_file(outputs["lora"])  # readable
    # Same request -> same run dir -> finished result returned without a new worker.
    again = _run_dir(tmp_path, fabric_dir)
    assert again == run_dir
    seen2 = []
    assert run_job(again, on_event=seen2.append) == outputs and seen2 == []


@pytest.mark.slow
def test_sigterm_to_the_worker_stops_it_with_a_checkpoint(fabric_dir, tmp_path):
    """systemd, `docker stop` or Ctrl-C in ComfyUI's console signal the worker itself: it must stop as Stop does."""
    run_dir = _run_dir(tmp_path, fabric_dir, max_train_steps=200, checkpoint_every=0, sample_every=0)

    def on_event(e):
        if e["event"] == "progress" and e.get("phase") == "training" and e["step"] == 2:
            os.kill(int((run_dir / "worker.pid").read_text()), signal.SIGTERM)

    with pytest.raises(JobInterrupted) as info:
        run_job(run_dir, on_event=on_event)
    checkpoint = info.value.checkpoint
    assert checkpoint and os.path.isdir(checkpoint) and finished_outputs(run_dir) is None
    assert "SIGTERM: stopping after this step" in (run_dir / "events.jsonl").read_text()
    stopped_at = int(os.path.basename(checkpoint).split("_")[1])
    assert 2 <= stopped_at < 200


def test_worker_user_error_is_reported_with_hint(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    run_dir = _run_dir(tmp_path, empty, with_prior_preservation=False)
    with pytest.raises(DreamLoomError) as info:
        run_job(run_dir)
    assert "No images" in info.value.message and "jpg" in info.value.hint and "log.txt" in info.value.hint


def test_busy_run_dir_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text(str(os.getppid()))  # a live process that is not us
    with pytest.raises(DreamLoomError, match="already running"):
        with RunLock(run_dir):
            pass
    (run_dir / ".lock").write_text("999999999")  # stale lock: taken over
    with RunLock(run_dir):
        assert (run_dir / ".lock").read_text() == str(os.getpid())
    assert not (run_dir / ".lock").exists()


def test_offline_guard_blocks_remote_connections():
    import subprocess
    import sys

    code = (
        "import socket\n"
        "from trainer.jobs.worker import install_offline_guard\n"
        "install_offline_guard()\n"
        "try:\n"
        "    socket.create_connection(('93.184.216.34', 80), timeout=2)\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
        "s = socket.socket(); s.settimeout(1)\n"
        "print('loopback', s.connect_ex(('127.0.0.1', 9)))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert "DreamLoomError Blocked a network connection" in r.stdout
    assert "loopback" in r.stdout


def test_log_lines_tell_the_run_without_flooding():
    from trainer.jobs.parent import describe_event

    phase: list = []
    lines = [
        describe_event({"event": "progress", "phase": "training", "step": s, "time": 1.0}, phase) for s in (1, 2, 3)
    ]
    assert lines[0].endswith("progress: phase=training, step=1") and lines[1:] == [None, None]
    assert describe_event({"event": "progress", "phase": "export", "step": 3}, phase).endswith("phase=export, step=3")
    done = describe_event({"event": "done", "outputs": {"lora": "/x" * 500, "samples": ["/y"] * 500}}, phase)
    assert done.endswith("done: outputs=lora, samples")  # the paths are in done.json
    assert len(describe_event({"event": "log", "message": "m" * 5000}, phase)) < 400


def test_class_image_job_loads_and_generates_in_the_inference_dtype(tmp_path, monkeypatch):
    """The Generate Class Images node's job runs where a GPU would give bf16 (faked here on the CPU): the model is
    loaded in bf16 (no fp32 copy in host memory first) and the pipeline generates in it. It used to load in fp32 and
    generate in fp32 on every device."""
    import trainer.base_models.load as load
    import trainer.data.class_images as class_images
    import trainer.training.precision as precision
    from trainer.events import Events
    from trainer.jobs.worker import _run
    from trainer.stop_signals import GracefulStop

    monkeypatch.setattr(precision, "inference_dtype", lambda device: torch.bfloat16)
    seen = {}
    real_load, real_generate = load.load_base_model, class_images._generate_missing

    def spy_load(spec, dtype=None, search_dirs=None):
        seen["load"] = dtype
        return real_load(spec, dtype, search_dirs)

    def spy_generate(comps, spec, missing, folder, batch_size, device, dtype, *rest):
        seen["generate"] = dtype
        return real_generate(comps, spec, missing, folder, batch_size, device, dtype, *rest)

    monkeypatch.setattr(load, "load_base_model", spy_load)
    monkeypatch.setattr(class_images, "_generate_missing", spy_generate)
    spec = dict(prompt="a fabric pattern", negative_prompt="", sampler="ddim", steps=2, guidance=1.0)
    job = {"kind": "class_images", "base_model": "tiny", "count": 2, "folder": str(tmp_path / "class"),
           "batch_size": 2, "spec": {**spec, "resolution": 64, "seed": 1}}  # fmt: skip
    outputs = _run(job, tmp_path, Events(tmp_path), GracefulStop())  # not entered: no signal handlers
    assert seen == {"load": torch.bfloat16, "generate": torch.bfloat16}
    assert len(outputs["images"]) == 2 and all(os.path.getsize(p) > 0 for p in outputs["images"])


def test_inference_dtype_is_half_on_a_gpu_and_fp32_on_the_cpu(monkeypatch):
    import trainer.training.precision as precision

    assert precision.inference_dtype(torch.device("cpu")) is None  # the models' own fp32
    # torch says yes to bf16 on a Turing card (RTX 20xx, T4: compute capability 7.5), where it is only emulated
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 5))
    assert precision.inference_dtype("cuda") == torch.float16
    assert precision.resolve_mixed_precision("auto", "cuda") == (
        "fp16",
        "auto: the GPU has no bf16 (compute capability under 8.0)",
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (8, 6))  # an RTX 30xx
    assert precision.inference_dtype("cuda") == torch.bfloat16
    assert precision.resolve_mixed_precision("auto", "cuda")[0] == "bf16"
