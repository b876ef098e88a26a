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
        "40",
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
    assert 2 <= stopped_at < 40

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


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_first_signal_asks_to_stop_and_a_second_stops_at_once(signum):
    from trainer.stop_signals import GracefulStop, Terminated

    previous = signal.getsignal(signum)
    announced = []
    with GracefulStop(announce=announced.append) as stop:
        assert not stop.requested()
        signal.raise_signal(signum)  # handled between bytecodes: the trainer sees it at its next poll
        assert stop.requested() and announced == [{signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}[signum]]
        expected = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt) as second:
            signal.raise_signal(signum)
        assert type(second.value) is expected
    assert stop.exit_code() == 128 + signum  # what a shell reports: 130 for Ctrl-C, 143 for SIGTERM
    assert signal.getsignal(signum) is previous  # the handler is put back


def test_after_the_packs_stop_its_sigterm_stops_at_once():
    """The pack writes its Stop file, waits, then sends SIGTERM: that SIGTERM must end the worker (clean-up runs)."""
    from trainer.stop_signals import GracefulStop, Terminated

    with GracefulStop() as stop:
        stop.ask()  # what the worker does on seeing the Stop file
        with pytest.raises(Terminated):
            signal.raise_signal(signal.SIGTERM)


def test_events_outlive_a_closed_reader_and_say_so(tmp_path):
    """ComfyUI ended: the worker's stdout pipe is closed. Events still reach events.jsonl; the worker learns to stop."""
    from trainer.events import Events

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    events = Events(tmp_path, stream=ClosedPipe())
    events.emit("progress", step=1)
    events.emit("progress", step=2)
    assert events.reader_gone and [json.loads(line)["step"] for line in (tmp_path / "events.jsonl").open()] == [1, 2]


def test_sigterm_to_any_command_runs_its_clean_up(monkeypatch, tmp_path, capsys):
    """Python's default SIGTERM ends the process with no `finally`: bench left its temporary folder behind."""
    from trainer.cli import main
    from trainer.lab import bench

    monkeypatch.setattr(bench.tempfile, "tempdir", str(tmp_path))
    started = []

    def prepare_then_sigterm(work, *args):
        started.append(work)
        signal.raise_signal(signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the bench")

    monkeypatch.setattr(bench, "_prepare_in_process", prepare_then_sigterm)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        code = main(["bench", "--base-model", "tiny", "--steps", "1", "--warmup", "1", "--repeats", "1"])
        assert signal.getsignal(signal.SIGTERM) is previous  # main() puts the handler back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 143 and "stopped by SIGTERM" in capsys.readouterr().err
    assert started and not started[0].exists() and not list(tmp_path.iterdir())


def test_bench_keeps_its_folder_when_a_contender_fails(monkeypatch, tmp_path):
    from trainer.lab import bench
    from trainer.lab.bench_measure import ContenderFailed

    monkeypatch.setattr(bench.tempfile, "tempdir", str(tmp_path))

    def failing_contender(work, *args):
        (work / "prepare.log").write_text("what went wrong")
        raise ContenderFailed("bench: the prepare process failed", "Fix what the log says.")

    monkeypatch.setattr(bench, "_prepare_in_process", failing_contender)
    with pytest.raises(ContenderFailed):
        bench.bench("tiny", steps=1, warmup=1, repeats=1)
    assert [p.read_text() for p in tmp_path.glob("dreamloom-bench-*/prepare.log")] == ["what went wrong"]


def test_a_contender_is_killed_when_the_bench_is_interrupted():
    from trainer.lab.bench_measure import kill_on_interrupt

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])

    def interrupted_wait():
        raise KeyboardInterrupt

    try:
        with pytest.raises(KeyboardInterrupt):
            kill_on_interrupt(child, interrupted_wait)
        assert child.poll() is not None  # ended, not left running
    finally:
        child.kill()
