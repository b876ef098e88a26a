"""glibc malloc settings for training on a CPU, given to a process in its environment before it starts.

With glibc's defaults a full-size SD1.5 training step on a CPU takes 0.3-0.9 M minor page faults (about a
third of its CPU time): large temporaries (oneDNN's weight reorders among them) are handed back to the kernel
after each step and faulted in again. Keeping freed memory in the process (trim and mmap thresholds) and
backing big blocks with transparent huge pages (hugetlb=1) took a measured step to ~0 faults. glibc reads
these only at start-up (mallopt cannot set hugetlb, and setting the thresholds late was measured not to help),
so whoever starts a training process puts them in its environment: the node pack's job runner does, and
`python -m trainer` re-executes itself once with them. Torch-free: imported before torch is.

Blocks above 32 MiB (the most mmap_threshold can be) still come from mmap whenever the heap has no free chunk
that big. On SD1.5's 1280-channel 3x3 convolutions oneDNN (ideep) reorders the frozen weight into a 56-113 MiB
temporary at every forward and backward: 54 blocks, 3.8 GB a step at 128 px. Once the trainer has trimmed the
heap (parking.py) none of them fits, so each was mmapped, faulted in and unmapped again every step (2-28k faults,
0.4-1.0 s of kernel time a step). `keep_large_blocks_in_heap`, called once before the steps, stops that: from
then on every block comes from the heap, the first step grows it and the later ones reuse it (0 faults).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

TUNED = {
    "glibc.malloc.trim_threshold": str(2**30),  # keep up to 1 GiB of freed heap instead of returning it
    "glibc.malloc.mmap_threshold": str(32 * 2**20),  # blocks up to 32 MiB (glibc's ceiling) from the heap
    "glibc.malloc.hugetlb": "1",  # madvise(MADV_HUGEPAGE) for the rest: one fault per 2 MiB, not per 4 KiB
}
OPT_OUT = "DREAMLOOM_MALLOC"  # =default leaves the allocator alone


def _tunables(value: str | None) -> dict[str, str]:
    pairs = (item.partition("=") for item in (value or "").split(":") if item)
    return {name: setting for name, _, setting in pairs}


def is_tuned(env: Mapping[str, str] = os.environ) -> bool:
    """True when every one of our settings is in GLIBC_TUNABLES (the user's own value for one counts)."""
    return set(TUNED) <= set(_tunables(env.get("GLIBC_TUNABLES")))


def wants_tuning(env: Mapping[str, str], cuda: bool) -> bool:
    """Tune for CPU training on glibc Linux, unless the user opted out or already set the variable themselves."""
    return sys.platform.startswith("linux") and not cuda and env.get(OPT_OUT) != "default" and not is_tuned(env)


def with_tuned_malloc(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with our settings added to GLIBC_TUNABLES; a setting the user already gave keeps their value."""
    merged = {**TUNED, **_tunables(env.get("GLIBC_TUNABLES"))}
    return {**env, "GLIBC_TUNABLES": ":".join(f"{name}={setting}" for name, setting in merged.items())}


def describe(env: Mapping[str, str] = os.environ) -> str:
    """What the allocator of a process started with `env` does, for the run's settings and the bench table."""
    if not sys.platform.startswith("linux"):
        return "default (not Linux)"
    if is_tuned(env):
        return "tuned (GLIBC_TUNABLES)"
    return "default (DREAMLOOM_MALLOC=default)" if env.get(OPT_OUT) == "default" else "default"


def cuda_expected(env: Mapping[str, str] = os.environ) -> bool:
    """A guess, without importing torch, that training will run on an NVIDIA GPU (then we leave malloc alone)."""
    if env.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    # /dev/dxg: WSL2's GPU, where CUDA runs without the Linux driver's nodes
    return any(Path(p).exists() for p in ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/dxg"))


def cuda_in_this_process() -> bool:
    """Whether this process (e.g. ComfyUI, which has torch imported) sees a CUDA device; a guess without torch."""
    torch = sys.modules.get("torch")
    if torch is None:
        return cuda_expected()
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # a broken CUDA install: the worker will report it
        return False


M_MMAP_MAX = -4  # mallopt's parameter number (malloc.h); 0 = never mmap, serve every block from the heap


def keep_large_blocks_in_heap(env: Mapping[str, str] = os.environ) -> bool:
    """From now on glibc serves every block from the heap, none with mmap (mallopt M_MMAP_MAX 0), so the steps'
    large temporaries are kept for the next step instead of being unmapped and faulted in again (see above).
    Only in a tuned process (the trim threshold keeps the freed blocks); call it after loading, whose large
    blocks are better mmapped (freed to the kernel at once). False where it did nothing."""
    if not sys.platform.startswith("linux") or not is_tuned(env):
        return False
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_MAX, 0))
    except (OSError, AttributeError):  # musl and other libcs
        return False


def release_free_memory() -> bool:
    """Hand the heap's free pages back to the kernel now (glibc's malloc_trim), after a large release that the
    trim threshold above would otherwise keep in the process. False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):  # musl and other libcs have no malloc_trim
        return False
