"""glibc malloc tuning for CPU training: the settings merge with the user's, `python -m trainer` re-executes
itself with them, and the job runner starts the worker with them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer import cpu_malloc

ROOT = Path(__file__).resolve().parents[1]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tuning is for Linux only")


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", cpu_malloc.OPT_OUT)}
    env["CUDA_VISIBLE_DEVICES"] = ""  # as on a machine without a GPU, whatever this one has
    return {**env, **extra}


def test_tuning_merges_with_the_users_settings():
    env = cpu_malloc.with_tuned_malloc({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0"})
    items = env["GLIBC_TUNABLES"].split(":")
    assert "glibc.malloc.arena_max=2" in items  # kept
    assert "glibc.malloc.hugetlb=0" in items and "glibc.malloc.hugetlb=1" not in items  # the user's value wins
    assert "glibc.malloc.trim_threshold=1073741824" in items and "glibc.malloc.mmap_threshold=33554432" in items
    assert cpu_malloc.is_tuned(env)
    assert not cpu_malloc.is_tuned({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})


@linux_only
def test_who_gets_tuned():
    assert cpu_malloc.wants_tuning({}, cuda=False)
    assert not cpu_malloc.wants_tuning({}, cuda=True)  # GPU training: host allocations are small, leave them
    assert not cpu_malloc.wants_tuning({cpu_malloc.OPT_OUT: "default"}, cuda=False)
    assert not cpu_malloc.wants_tuning(cpu_malloc.with_tuned_malloc({}), cuda=False)  # no second re-exec
    assert not cpu_malloc.cuda_expected({"CUDA_VISIBLE_DEVICES": ""})


def test_a_wsl2_gpu_counts_as_cuda(monkeypatch):
    """WSL2 has CUDA through /dev/dxg, without the Linux driver's /dev/nvidiactl: GPU runs there were given the
    CPU allocator tuning."""
    import pathlib

    monkeypatch.setattr(pathlib.Path, "exists", lambda self: str(self) == "/dev/dxg")
    assert cpu_malloc.cuda_expected({})
    monkeypatch.setattr(pathlib.Path, "exists", lambda self: False)
    assert not cpu_malloc.cuda_expected({})


@linux_only
def test_large_blocks_stay_in_the_heap_once_asked():
    code = (
        "import ctypes\n"
        "from trainer import cpu_malloc\n"
        "libc = ctypes.CDLL('libc.so.6')\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        "names = 'arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost'.split()\n"
        "class Info(ctypes.Structure):\n"
        "    _fields_ = [(n, ctypes.c_size_t) for n in names]\n"
        "libc.mallinfo2.restype = Info\n"
        "def mapped():\n"
        "    p = libc.malloc(96 * 2**20)\n"
        "    n = libc.mallinfo2().hblks\n"
        "    libc.free(p)\n"
        "    return n\n"
        "before = mapped()\n"
        "print(before, cpu_malloc.keep_large_blocks_in_heap(), mapped() - before)\n"
    )
    env = cpu_malloc.with_tuned_malloc(_clean_env(PYTHONPATH=str(ROOT)))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    before, asked, extra = out.split()
    assert int(before) >= 1 and asked == "True" and extra == "-1"  # the 96 MiB block was mmapped, then is not
    assert not cpu_malloc.keep_large_blocks_in_heap({})  # untuned (DREAMLOOM_MALLOC=default): left alone


def _doctor_allocator_line(env: dict) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "trainer", "doctor", "--base-model", "tiny"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=True,
    ).stdout  # fmt: skip
    return next(line for line in out.splitlines() if "CPU allocator" in line)


@linux_only
def test_cli_reexecutes_itself_tuned_and_honours_the_opt_out():
    assert "tuned (GLIBC_TUNABLES)" in _doctor_allocator_line(_clean_env())
    assert "default (DREAMLOOM_MALLOC=default)" in _doctor_allocator_line(_clean_env(DREAMLOOM_MALLOC="default"))


@linux_only
def test_job_runner_starts_the_worker_tuned(tmp_path, monkeypatch):
    from trainer.jobs import parent

    seen = {}

    class FakePopen:  # records the worker's environment instead of starting it
        def __init__(self, cmd, env, **kwargs):
            seen["env"] = env
            raise OSError("not started in this test")

    monkeypatch.setattr(parent.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(cpu_malloc, "cuda_in_this_process", lambda: False)
    for name in ("GLIBC_TUNABLES", cpu_malloc.OPT_OUT):
        monkeypatch.delenv(name, raising=False)
    run_dir = tmp_path / "runs" / "job"
    run_dir.mkdir(parents=True)
    (run_dir / "job.json").write_text("{}")
    with pytest.raises(OSError):
        parent.run_job(run_dir)
    assert cpu_malloc.is_tuned(seen["env"])
