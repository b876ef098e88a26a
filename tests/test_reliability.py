"""Faults, fuzzing and the security rules: nothing is lost, nothing half-written is published, only
DreamLoomError reaches the user."""

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer.config import TrainConfig
from trainer.errors import DreamLoomError
from trainer.files.atomic import atomic_save, atomic_write_text, publish

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- names and publishing
def test_publish_never_overwrites_a_different_file(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"first")
    b.write_bytes(b"second")
    dest = tmp_path / "loras"
    assert publish(a, dest, "fabric", ".safetensors").name == "fabric.safetensors"
    assert publish(a, dest, "fabric", ".safetensors").name == "fabric.safetensors"  # same bytes: reused
    assert publish(b, dest, "fabric", ".safetensors").name == "fabric_v2.safetensors"
    assert (dest / "fabric.safetensors").read_bytes() == b"first"
    for bad in ("../../x", "/abs/path", "nul\x00byte", "a:b", "CON", "..", ""):
        with pytest.raises(DreamLoomError):
            publish(a, dest, bad, ".safetensors")
    assert sorted(p.name for p in dest.iterdir()) == ["fabric.safetensors", "fabric_v2.safetensors"]


def test_disk_full_during_publish_leaves_nothing_half_written(tmp_path, monkeypatch):
    src = tmp_path / "lora.safetensors"
    src.write_bytes(os.urandom(1 << 20))
    dest = tmp_path / "loras"

    def full_disk_copy(s, d, *a, **k):
        with open(d, "wb") as fh:
            fh.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full_disk_copy)
    with pytest.raises(OSError):
        publish(src, dest, "fabric", ".safetensors")
    assert list(dest.iterdir()) == []  # no truncated file, no temp file


@pytest.mark.parametrize("code", [errno.EPERM, errno.ENOTSUP, errno.EXDEV], ids=["EPERM", "ENOTSUP", "EXDEV"])
def test_publish_without_hard_links_copies_and_never_overwrites(tmp_path, monkeypatch, code):
    """exFAT and some network drives refuse hard links: publishing falls back to an exclusive create."""
    calls = []

    def no_links(src, dst, *a, **k):
        calls.append(dst)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "link", no_links)
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(os.urandom(3 << 20))  # more than one copy chunk
    b.write_bytes(b"second")
    dest = tmp_path / "loras"
    first = publish(a, dest, "fabric", ".safetensors")
    assert calls and first.name == "fabric.safetensors" and first.read_bytes() == a.read_bytes()
    assert publish(a, dest, "fabric", ".safetensors") == first  # same bytes: reused
    assert publish(b, dest, "fabric", ".safetensors").name == "fabric_v2.safetensors"
    assert publish(a, dest, "fabric", ".safetensors") == first
    assert first.read_bytes() == a.read_bytes() and (dest / "fabric_v2.safetensors").read_bytes() == b"second"
    assert sorted(p.name for p in dest.iterdir()) == ["fabric.safetensors", "fabric_v2.safetensors"]  # no temp files


def test_publish_without_hard_links_leaves_no_partial_file_when_the_copy_fails(tmp_path, monkeypatch):
    src = tmp_path / "lora.safetensors"
    src.write_bytes(os.urandom(1 << 20))
    dest = tmp_path / "loras"
    (dest / "fabric.safetensors").parent.mkdir()
    (dest / "fabric.safetensors").write_bytes(b"someone else's file")
    real_copyfileobj = shutil.copyfileobj

    def no_links(*a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")

    def full_disk_into_final_name(fsrc, fdst, *a, **k):
        if not Path(fdst.name).name.startswith("fabric"):  # the temp copy (if copyfile uses this) works
            return real_copyfileobj(fsrc, fdst, *a, **k)
        fdst.write(b"x" * 1000)
        fdst.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(shutil, "copyfileobj", full_disk_into_final_name)
    with pytest.raises(OSError) as info:
        publish(src, dest, "fabric", ".safetensors")
    assert info.value.errno == errno.ENOSPC
    # The other file is untouched, nothing half-written under fabric_v2, no temp file.
    assert sorted(p.name for p in dest.iterdir()) == ["fabric.safetensors"]
    assert (dest / "fabric.safetensors").read_bytes() == b"someone else's file"


def test_publish_reports_other_link_errors(tmp_path, monkeypatch):
    """Only a file system without hard links falls back; a real fault (here: I/O error) is raised."""
    src = tmp_path / "a.bin"
    src.write_bytes(b"first")

    def broken(*a, **k):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "link", broken)
    with pytest.raises(OSError) as info:
        publish(src, tmp_path / "loras", "fabric", ".safetensors")
    assert info.value.errno == errno.EIO and list((tmp_path / "loras").iterdir()) == []


def test_disk_full_during_atomic_save_keeps_the_old_file(tmp_path):
    path = tmp_path / "loss.csv"
    atomic_write_text(path, "old")

    def writer(tmp):
        tmp.write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        atomic_save(path, writer)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["loss.csv"]


# --------------------------------------------------------------------------- a kill during a checkpoint write
CHILD = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    import trainer.training.checkpoint as checkpoint
    run = Path(sys.argv[1])
    state = {"w": torch.ones(3)}
    checkpoint.save_checkpoint(run, 2, state, {}, {}, {}, {"train_id": "x"}, keep=5)
    real_save = torch.save
    def slow_save(obj, f, *a, **k):
        Path(f).write_bytes(b"half")
        (run / "writing").write_text("1")
        time.sleep(60)
    torch.save = slow_save
    checkpoint.save_checkpoint(run, 4, {"w": torch.zeros(3)}, {}, {}, {}, {"train_id": "x"}, keep=5)
""")


def test_kill_during_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    from trainer.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint

    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], cwd=ROOT)
    deadline = time.time() + 120
    while not (tmp_path / "writing").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    ckpt = load_checkpoint(latest_checkpoint(tmp_path))
    assert ckpt["step"] == 2 and torch.equal(ckpt["trainable"]["w"], torch.ones(3))
    assert list((tmp_path / "checkpoints").glob(".step_00004.*")), (
        "the half-written folder is only a hidden temp folder"
    )
    save_checkpoint(tmp_path, 6, {"w": torch.ones(3)}, {}, {}, {}, {"train_id": "x"}, keep=5)
    assert not list((tmp_path / "checkpoints").glob(".step_*")), "stale temp folders are cleaned up"


def test_damaged_checkpoint_is_a_clear_error(tmp_path):
    from trainer.training.checkpoint import load_checkpoint, save_checkpoint

    path = save_checkpoint(tmp_path, 2, {"w": torch.ones(3)}, {}, {}, {}, {}, keep=2)
    (path / "trainable.safetensors").write_bytes(b"garbage")
    with pytest.raises(DreamLoomError, match="damaged") as info:
        load_checkpoint(path)
    assert "Delete that checkpoint folder" in info.value.hint


# --------------------------------------------------------------------------- concurrency
@pytest.mark.slow
def test_two_requests_in_one_process_run_one_after_the_other(tmp_path, fabric_dir):
    """The decision: within one process a second job waits for the first (in order); the run folder of a
    job that another live process is running is refused (see test_jobs.test_busy_run_dir_is_refused)."""
    from conftest import tiny_config

    from trainer.jobs.parent import prepare_run_dir, run_job

    runs = []
    for seed in (1, 2):
        cfg = tiny_config(fabric_dir, max_train_steps=3, seed=seed, with_prior_preservation=False).validate()
        runs.append(prepare_run_dir(tmp_path / "runs", {"kind": "train", "config": cfg.to_dict()}, {}))
    events = {0: [], 1: []}
    threads = [
        threading.Thread(target=run_job, args=(d,), kwargs={"on_event": events[i].append}) for i, d in enumerate(runs)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    spans = sorted((e[0]["time"], e[-1]["time"]) for e in events.values())
    assert all(e[-1]["event"] == "done" for e in events.values())
    assert spans[1][0] >= spans[0][1], f"the jobs overlapped: {spans}"


# --------------------------------------------------------------------------- fuzzing
FIELDS = [f.name for f in __import__("dataclasses").fields(TrainConfig)]
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.lists(st.text(max_size=8), max_size=4),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=12)), values, max_size=6))
def test_fuzz_config_parser(data):
    try:
        TrainConfig.from_dict(data).validate()
    except DreamLoomError:
        pass


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(st.sampled_from([".png", ".jpg", ".JPEG", ".webp", ".bmp"]), st.binary(max_size=600)),
        min_size=1,
        max_size=4,
    ),
    st.booleans(),
)
def test_fuzz_dataset_loader_with_random_bytes(tmp_path_factory, files, with_valid_header):
    from trainer.data.images import load_image_folder

    folder = tmp_path_factory.mktemp("fuzz")
    headers = {
        ".png": b"\x89PNG\r\n\x1a\n",
        ".jpg": b"\xff\xd8\xff",
        ".JPEG": b"\xff\xd8\xff",
        ".webp": b"RIFF\0\0\0\0WEBP",
        ".bmp": b"BM",
    }
    for i, (suffix, data) in enumerate(files):
        (folder / f"f{i}{suffix}").write_bytes((headers[suffix] if with_valid_header else b"") + data)
    try:
        load_image_folder(folder, 64)
    except DreamLoomError as err:
        assert "cannot be used" in err.message or "No images" in err.message


shapes = st.tuples(st.integers(1, 6), st.integers(1, 6))
key_parts = st.sampled_from(
    [
        "lora_unet_down_blocks_0_attentions_0_proj_in",
        "unet.mid_block.attentions.0.to_q",
        "base_model.model.up_blocks.1.attn1.to_k",
        "text_encoder.text_model.encoder.layers.0.mlp.fc1",
        "lora_te_text_model_encoder_layers_1_self_attn_q_proj",
        "weird",
        "diffusion_model.x",
    ]
)
suffixes = st.sampled_from(
    [
        ".lora_down.weight",
        ".lora_up.weight",
        ".alpha",
        ".lora_A.weight",
        ".lora_B.weight",
        ".lora.down.weight",
        ".lora.up.weight",
        ".weight",
        ".lora_magnitude_vector",
        "",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.tuples(key_parts, suffixes).map("".join), shapes, max_size=8),
    st.one_of(st.none(), st.fixed_dictionaries({"r": st.integers(1, 8), "lora_alpha": st.floats(0.1, 64)})),
)
def test_fuzz_lora_importer(keys, adapter_config):
    from trainer.formats.lora_import import convert_state_dict

    sd = {k: torch.zeros(shape) for k, shape in keys.items()}
    try:
        result = convert_state_dict(sd, adapter_config=adapter_config)
    except DreamLoomError:
        return
    for m in result.modules:
        assert {f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha"} <= set(result.tensors)


# --------------------------------------------------------------------------- security rules
def test_no_eval_exec_or_runtime_pip_in_the_code():
    offenders = []
    for path in list((ROOT / "trainer").rglob("*.py")) + list((ROOT / "nodes").rglob("*.py")) + [ROOT / "__init__.py"]:
        text = path.read_text()
        for pattern in (
            r"(?<![\w.])eval\(",
            r"(?<![\w.])exec\(",
            r"subprocess[^\n]*pip",
            r"pip\.main",
            r"torch\.load\((?![^)]*weights_only=True)",
        ):
            for m in re.finditer(pattern, text):
                offenders.append(f"{path.relative_to(ROOT)}: {text[m.start() : m.start() + 60]!r}")
    assert offenders == []


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_written_files_and_checkpoints_get_the_umasks_permissions(tmp_path):
    """Results and checkpoints were 0600/0700 (safetensors replaces the temporary file it is given, mkdtemp makes
    0700 folders), unreadable by a ComfyUI run as another user."""
    from safetensors.torch import save_file

    from trainer.training.checkpoint import save_checkpoint

    umask = os.umask(0o022)
    os.umask(umask)
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    out = atomic_save(tmp_path / "lora.safetensors", lambda tmp: save_file({"w": torch.ones(2)}, str(tmp)))
    assert out.stat().st_mode & 0o777 == file_mode
    folder = save_checkpoint(tmp_path / "run", 3, {"w": torch.ones(2)}, {}, {}, {}, {}, keep=2)
    assert folder.stat().st_mode & 0o777 == dir_mode
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {
        "trainable.safetensors": file_mode,
        "state.pt": file_mode,
        "state.json": file_mode,
    }
