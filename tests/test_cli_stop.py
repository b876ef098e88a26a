"""Ctrl-C during `python -m trainer train`: a checkpoint is written, the message says how to resume, and the same
command resumes from it."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _training_step(events: Path) -> int:
    step = 0
    if events.exists():
        for line in events.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                continue
            if record.get("event") == "progress" and record.get("phase") == "training":
                step = max(step, record.get("step", 0))
    return step


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_the_same_command_resumes(fabric_dir, tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "trainer",
        "train",
        "--base-model",
        "tiny",
        "--instance-dir",
        str(fabric_dir),
        "--max-train-steps",
        "150",
        "--with-prior-preservation",
        "false",
        "--sample-every",
        "0",
        "--checkpoint-every",
        "0",
        "--output-dir",
        str(out),
    ]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    while _training_step(out / "events.jsonl") < 2:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() - started < 600, "hang guard"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Run the same command again to resume" in stderr and "Traceback" not in stderr
    checkpoints = sorted((out / "checkpoints").glob("step_*"))
    assert checkpoints and not (out / "result").exists()
    stopped_at = int(checkpoints[-1].name.split("_")[1])
    assert 2 <= stopped_at < 150

    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from checkpoint at step {stopped_at}" in (out / "events.jsonl").read_text()
    assert Path(json.loads(again.stdout)["lora"]).exists()


def test_a_failed_set_up_ends_events_with_an_error(tmp_path, fabric_dir):
    """The run folder's events.jsonl must not stop at 'loading' when set-up fails."""
    out = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "train",
            "--base-model",
            "tiny",
            "--instance-dir",
            str(fabric_dir),
            "--method",
            "ti",
            "--initializer-token",
            "xqzvbkw",  # one word, six tokens: refused when the method is set up
            "--max-train-steps",
            "2",
            "--output-dir",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.count("is 6 tokens") == 1, result.stderr[-2000:]  # said once, by the `error:` line
    assert (out / "events.jsonl").exists(), result.stderr[-2000:]
    last = json.loads((out / "events.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "error" and "initializer" in last["message"]
