"""The worker starts under ComfyUI's Windows portable Python.

That build runs an embedded interpreter configured by a `python3XX._pth` file: the file alone makes
sys.path, PYTHONPATH and the other PYTHON* variables are ignored, and neither the working folder nor a
script's folder is added. `python -m trainer worker ...` with the pack on PYTHONPATH therefore failed there
with "No module named trainer". These tests run the real `run_job` under an isolated (`-I`) interpreter
from an unrelated folder, and under an interpreter laid out like the portable build.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.jobs.parent import PACK_ROOT, prepare_run_dir, run_job, worker_command

posix_only = pytest.mark.skipif(os.name == "nt", reason="builds its interpreter with a shell script or a symlink")


def _class_images_run_dir(root: Path) -> Path:
    """A two-image class-image job with the built-in random `tiny` model (the quickest real job)."""
    request = {
        "kind": "class_images",
        "base_model": "tiny",
        "spec": dict(
            prompt="a fabric pattern",
            negative_prompt="",
            sampler="ddim",
            steps=2,
            guidance=1.0,
            resolution=64,
            seed=1,
        ),
        "count": 2,
        "folder": str(root / "class images"),
        "batch_size": 2,
    }
    # Spaces, quotes and a non-ASCII letter in the job's path: it reaches the worker as argv.
    return prepare_run_dir(root / "runs 'ü' & $x", request, {"model": "tiny"}, name_hint="class")


def _check_finished(run_dir: Path, outputs: dict, seen: list[dict]) -> None:
    assert [e["event"] for e in seen][-1] == "done"
    assert len(outputs["images"]) == 2 and all(Path(p).is_file() for p in outputs["images"])
    assert "--- worker started" in (run_dir / "log.txt").read_text(encoding="utf-8")


def _probe(python: str, cwd: Path, env: dict, *flags: str) -> dict:
    """The child's sys.path and isolated flag."""
    code = "import json, sys; print(json.dumps({'path': sys.path, 'isolated': sys.flags.isolated}))"
    r = subprocess.run([python, *flags, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _on_path(entries: list[str], folder: Path, cwd: Path) -> bool:
    return any(Path(cwd, p).resolve() == folder.resolve() for p in entries)  # "" is the working folder


def test_bootstrap_passes_odd_paths_and_the_exit_code(tmp_path):
    """A stand-in pack under an awkward name: both paths arrive untouched, the exit code comes back."""
    name = "pack 'ü' & $x" + (' "q"' if os.name != "nt" else "")
    stub = tmp_path / name / "trainer"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("")
    (stub / "cli.py").write_text(
        "import json, sys\ndef main(argv):\n    print(json.dumps({'argv': argv, 'from': __file__}))\n    return 7\n",
        encoding="utf-8",
    )
    job = tmp_path / "run 'ü' \u00e9" / "job.json"
    cmd = worker_command(job, pack_root=stub.parent)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [cmd[0], "-I", *cmd[1:]], cwd=cwd, env=env, capture_output=True, text=True, encoding="utf-8", timeout=60
    )
    assert r.returncode == 7, r.stderr
    got = json.loads(r.stdout)
    assert got["argv"] == ["worker", str(job)]
    assert Path(got["from"]).resolve() == (stub / "cli.py").resolve()


@posix_only
def test_worker_runs_under_an_isolated_python_from_an_unrelated_folder(tmp_path, monkeypatch):
    """`-I` ignores PYTHONPATH and adds neither the working folder nor a script's folder to sys.path."""
    isolated = tmp_path / "python-isolated"
    isolated.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -I "$@"\n')
    isolated.chmod(0o755)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(PACK_ROOT)}
    probe = _probe(str(isolated), PACK_ROOT, env)
    assert probe["isolated"] and not _on_path(probe["path"], PACK_ROOT, PACK_ROOT)

    run_dir = _class_images_run_dir(tmp_path)
    monkeypatch.setattr(sys, "executable", str(isolated))  # run_job starts the worker with sys.executable
    monkeypatch.chdir(elsewhere)
    seen: list[dict] = []
    outputs = run_job(run_dir, on_event=seen.append, env={"PYTHONPATH": str(elsewhere)})
    _check_finished(run_dir, outputs, seen)


def _portable_python(folder: Path) -> Path:
    """This interpreter behind a `python3XX._pth` that lists the standard library and site-packages only.

    On POSIX CPython honours `<executable>._pth` since 3.11 (Modules/getpath.py), so naming the link
    `python3XX` gives the same file name as the Windows embeddable build (`python3XX._pth`).
    """
    clean = folder / "probe-cwd"
    clean.mkdir(parents=True)
    # This environment's search path (standard library, site-packages) without the pack: like the embedded
    # build's `python3XX.zip`, `.` (its own folder) and `Lib/site-packages`.
    entries = [p for p in _probe(sys.executable, clean, dict(os.environ), "-I")["path"] if p]
    entries = [p for p in entries if not _on_path([p], PACK_ROOT, clean)]
    python = folder / f"python{sys.version_info.major}{sys.version_info.minor}"
    python.symlink_to(os.path.realpath(sys.executable))
    Path(f"{python}._pth").write_text("\n".join(entries) + "\n", encoding="utf-8")
    return python


@posix_only
def test_worker_runs_under_a_portable_pth_python(tmp_path, monkeypatch):
    python = _portable_python(tmp_path / "python_embeded")
    # What the parent gives the worker, and what made `python -m trainer` work everywhere else.
    env = {**os.environ, "PYTHONPATH": str(PACK_ROOT)}
    probe = _probe(str(python), PACK_ROOT, env)
    if not probe["isolated"]:
        pytest.skip(f"this Python ({sys.version.split()[0]}) ignores ._pth files on {sys.platform}")
    assert not _on_path(probe["path"], PACK_ROOT, PACK_ROOT)  # the layout is faithful: the pack is not importable

    run_dir = _class_images_run_dir(tmp_path)
    # The start command DreamLoom used before fails here exactly as users saw it.
    old = subprocess.run(
        [str(python), "-m", "trainer", "worker", str(run_dir / "job.json")],
        cwd=PACK_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert old.returncode != 0 and "No module named trainer" in old.stderr

    monkeypatch.setattr(sys, "executable", str(python))
    seen: list[dict] = []
    outputs = run_job(run_dir, on_event=seen.append)
    _check_finished(run_dir, outputs, seen)
