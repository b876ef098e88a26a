"""The CLI refuses what it cannot do with one `error:` line and a `fix:` line (exit 2, no traceback), before
torch is imported and before anything is written; what it can do but should not do silently, it warns about."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "peft")

# Runs trainer.cli.main in a fresh interpreter and reports, last on stderr, which heavy modules were imported.
PROBE = (
    "import json, sys\n"
    "from trainer.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    f"heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
    "print('HEAVY ' + json.dumps(heavy), file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


class Run:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.rc = proc.returncode
        self.stdout = proc.stdout
        lines = proc.stderr.splitlines()
        self.heavy = json.loads(lines[-1][len("HEAVY ") :]) if lines and lines[-1].startswith("HEAVY ") else None
        self.stderr = "\n".join(lines[:-1] if self.heavy is not None else lines)


def cli(*args: str, cwd: Path = ROOT, timeout: int = 600) -> Run:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Run(proc)


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with the bytes of each file (None for folders)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def assert_refused(run: Run, *needles: str, torch_free: bool = True) -> None:
    """One error line and its fix, exit 2, no traceback; with torch_free, before any heavy import."""
    assert run.rc == 2, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    error_lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    fix_lines = [line for line in run.stderr.splitlines() if line.startswith("fix:")]
    assert len(error_lines) == 1 and len(fix_lines) == 1, run.stderr
    for needle in needles:
        assert needle in run.stderr, (needle, run.stderr)
    if torch_free:
        assert run.heavy == [], f"imported {run.heavy} before refusing:\n{run.stderr}"


def train_args(out, instance, *extra) -> list[str]:
    return ["train", "--base-model", "tiny", "--output-dir", str(out), "--instance-dir", str(instance), *extra]


# --------------------------------------------------------------------------- 1. an output folder that cannot be written
def test_output_dir_that_is_a_file_is_refused(fabric_dir, tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("keep me")
    before = tree(tmp_path)
    r = cli(*train_args(blocker, fabric_dir))
    assert_refused(r, f"--output-dir {blocker} is a file, not a folder", "fix: Give --output-dir a folder")
    r = cli("class-images", "--base-model", "tiny", "--output-dir", blocker, "--count", "1")
    assert_refused(r, "is a file, not a folder")
    assert tree(tmp_path) == before  # the file is untouched, nothing else written


def test_output_path_under_a_file_is_refused(fabric_dir, tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("keep me")
    before = tree(tmp_path)
    r = cli(*train_args(blocker / "run", fabric_dir))
    assert_refused(r, f"{blocker} is a file, not a folder", "cannot be created")
    r = cli("generate", "--base-model", "tiny", "--steps", "1", "--out", blocker / "sub" / "grid.png")
    assert_refused(r, "--out", "cannot be created")
    r = cli("class-images", "--base-model", "tiny", "--count", "1", "--cache-dir", blocker / "cache")
    assert_refused(r, "--cache-dir", "cannot be created")
    r = cli(*train_args(tmp_path / "run", fabric_dir, "--cache-dir", str(blocker / "cache")))
    assert_refused(r, "--cache-dir", "cannot be created")
    assert tree(tmp_path) == before


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write in read-only folders")
def test_read_only_output_dir_is_refused(fabric_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        r = cli(*train_args(locked / "run", fabric_dir))
        assert_refused(r, "cannot be written", "no permission")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


# --------------------------------------------------------------------------- 3. settings that defeat DreamBooth
@pytest.mark.parametrize(
    "class_prompt,needle",
    [("a sks african fabric pattern", "is the same as instance_prompt"), ("a SKS fabric", "contains the token 'sks'")],
)
def test_class_prompt_that_defeats_prior_preservation_is_refused(fabric_dir, tmp_path, class_prompt, needle):
    r = cli(*train_args(tmp_path / "run", fabric_dir, "--class-prompt", class_prompt))
    assert_refused(r, f"class_prompt = {class_prompt!r}", "instance_prompt = 'a sks african fabric pattern'", needle)
    assert "'an african fabric pattern'" in r.stderr  # the fix suggests the prompt without the token
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- 5. generate and class-images
def test_pickles_are_refused_by_generate_and_class_images(tmp_path):
    for name in ("model.ckpt", "lora.pt", "pytorch_lora_weights.bin", "emb.pt"):
        (tmp_path / name).write_bytes(b"\x80\x02not really a pickle")
    out = tmp_path / "grid.png"
    for args, needle in (
        (["generate", "--base-model", tmp_path / "model.ckpt", "--out", out], "model.ckpt is a pickle-based"),
        (["generate", "--base-model", "tiny", "--lora", tmp_path / "lora.pt", "--out", out], "lora.pt is a pickle"),
        (
            ["generate", "--base-model", "tiny", "--lora", tmp_path / "pytorch_lora_weights.bin", "--out", out],
            "pytorch_lora_weights.bin is a pickle",
        ),
        (["generate", "--base-model", "tiny", "--embedding", tmp_path / "emb.pt", "--out", out], "emb.pt is a pickle"),
        (["morph", "--base-model", tmp_path / "model.ckpt", "--out", tmp_path / "m.gif"], "model.ckpt is a pickle"),
        (
            ["class-images", "--base-model", tmp_path / "model.ckpt", "--output-dir", tmp_path / "cls"],
            "model.ckpt is a pickle-based",
        ),
    ):
        r = cli(*args)
        assert_refused(r, needle, "only .safetensors", "fix: Convert it to .safetensors")
        assert "weights_only" not in r.stderr
    assert not out.exists() and not (tmp_path / "cls").exists() and not (tmp_path / "m.gif").exists()


def test_a_damaged_safetensors_file_is_refused_before_torch(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    r = cli("generate", "--base-model", bad, "--out", tmp_path / "grid.png")
    assert_refused(r, "model.safetensors")
    r = cli("generate", "--base-model", "tiny", "--lora", tmp_path / "missing.safetensors")
    assert_refused(r, "LoRA file not found")


def test_several_adapters_are_each_checked_before_torch(tmp_path):
    import torch
    from safetensors.torch import save_file

    lora, emb = tmp_path / "style.safetensors", tmp_path / "emb.safetensors"
    for path in (lora, emb):
        save_file({"w": torch.zeros(1)}, str(path))
    out = tmp_path / "grid.png"
    for args, needles in (
        (["merge-lora", "--checkpoint", lora, "--lora", f"{lora}:0,7", "--out", out], ["decimal comma", ":0.7"]),
        (["generate", "--lora", f"{lora}:0,5", "--out", out], ["decimal comma", ":0.5"]),
        (["generate", "--lora", lora, "--lora", tmp_path / "none.safetensors"], ["LoRA file not found"]),
        (["generate", "--embedding", emb, "--embedding", emb], ["2 --embedding files and 0 --embedding-token"]),
        (
            ["generate", "--embedding", emb, "--embedding", emb, *["--embedding-token", "<a>"] * 2],
            ["the same --embedding-token"],
        ),
    ):
        assert_refused(cli(*args), *needles)
    assert not out.exists()


@pytest.mark.parametrize(
    "command,flag,value",
    [
        ("generate", "--steps", "0"),
        ("generate", "--steps", "5000"),
        ("generate", "--guidance", "-1"),
        ("generate", "--guidance", "nan"),
        ("generate", "--resolution", "100"),
        ("generate", "--resolution", "4096"),
        ("generate", "--resolution", "32"),
        ("generate", "--batch-size", "0"),
        ("generate", "--sampler", "plms"),
        ("generate", "--seed", "-1"),
        ("generate", "--lora-scale", "inf"),
        ("generate", "--out", "grid.jpg"),
        ("class-images", "--count", "0"),
        ("class-images", "--count", "-3"),
        ("class-images", "--batch-size", "0"),
        ("class-images", "--resolution", "60"),
        ("class-images", "--steps", "0"),
        ("class-images", "--guidance", "99"),
        ("class-images", "--seed", "-5"),
        ("class-images", "--class-prompt", " "),
        ("morph", "--fps", "0"),
        ("morph", "--seconds", "-1"),
        ("morph", "--seeds", "7"),
        ("morph", "--out", "m.avi"),
        ("morph", "--hold-frames", "90"),  # 15 s x 30 fps over 5 keyframes: 90 frames each, none left to morph
    ],
)
def test_generation_settings_are_checked_before_anything_runs(tmp_path, command, flag, value):
    out_flag = {"generate": "--out", "morph": "--out", "class-images": "--output-dir"}[command]
    out = tmp_path / {"generate": "grid.png", "morph": "m.gif", "class-images": "classes"}[command]
    args = [command, "--base-model", "tiny", out_flag, out, flag, value]
    if flag == "--out":
        args = [command, "--base-model", "tiny", flag, tmp_path / value]
    r = cli(*args)
    needle = {"--class-prompt": "class prompt", "--seeds": "seed"}.get(flag, flag)
    assert_refused(r, needle)
    assert list(tmp_path.iterdir()) == []  # no picture, no class folder, no manifest


def test_class_images_refused_after_loading_leaves_no_folder(tmp_path, monkeypatch, capsys):
    """A refusal that comes only once the model is loaded and the folder made takes the folder back."""
    import trainer.data.class_images as class_images
    from trainer.cli import main
    from trainer.errors import DreamLoomError

    def refuse(*args, **kwargs):
        raise DreamLoomError("The sampler cannot run here.", "Try another sampler.")

    monkeypatch.setattr(class_images, "_generate_missing", refuse)
    cache = tmp_path / "cache"
    rc = main(["class-images", "--base-model", "tiny", "--count", "2", "--steps", "1", "--cache-dir", str(cache)])
    err = capsys.readouterr().err
    assert rc == 2 and "error: The sampler cannot run here." in err and "fix: Try another sampler." in err
    assert not cache.exists()  # no manifest, no key folder, no class_images/ folder, no cache folder
    given = tmp_path / "given"
    given.mkdir()
    (given / "notes.txt").write_text("mine")
    rc = main(["class-images", "--base-model", "tiny", "--count", "2", "--steps", "1", "--output-dir", str(given)])
    assert rc == 2 and tree(given) == {"notes.txt": b"mine"}  # the user's folder stays, without our manifest


# --------------------------------------------------------------------------- 6. path errors come before torch
def test_path_errors_come_before_torch_is_imported(fabric_dir, tmp_path):
    r = cli(*train_args(tmp_path / "run", tmp_path / "no-such-folder"))
    assert_refused(r, "Image folder not found")
    r = cli(*train_args(tmp_path / "run", fabric_dir, "--base-model", str(tmp_path / "missing.safetensors")))
    assert_refused(r, "Base model not found")
    r = cli("train", "--output-dir", tmp_path / "run", "--base-model", "tiny")
    assert_refused(r, "No instance images given")
    r = cli(*train_args(tmp_path / "run", fabric_dir, "--config", str(tmp_path / "missing.toml")))
    assert_refused(r, "Config file not found")
    r = cli("generate", "--base-model", tmp_path / "no-model", "--out", tmp_path / "grid.png")
    assert_refused(r, "Base model not found")
    assert list(tmp_path.iterdir()) == []


def test_importtime_shows_no_torch_for_a_missing_instance_folder(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "trainer", *train_args(tmp_path / "run", tmp_path / "nope")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "error: Image folder not found" in proc.stderr
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "trainer.cli" in imported and not imported & set(HEAVY)


# --------------------------------------------------------------------------- 2, 4, 7: one real run, then re-runs
@pytest.fixture(scope="module")
def finished_run(fabric_dir, tmp_path_factory):
    """A finished 2-step LoRA run on `tiny`, trained on images next to unreadable picture types and captions
    that are not UTF-8 or too long."""
    root = tmp_path_factory.mktemp("finished")
    instance = root / "instance"
    shutil.copytree(fabric_dir, instance)
    Image.new("RGB", (64, 64), "red").save(instance / "animated.gif")
    (instance / "phone photo.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (instance / "scan.tiff").write_bytes(b"II*\x00")
    (instance / "fabric_01.txt").write_bytes("a sks fabric, caf\u00e9 ".encode("latin-1") + b"\xff\xfe woven")
    (instance / "fabric_02.txt").write_text(" ".join(["a sks fabric pattern with woven kente strips"] * 12))
    run_dir = root / "run"
    args = train_args(
        run_dir,
        instance,
        "--max-train-steps",
        "2",
        "--with-prior-preservation",
        "false",
        "--use-captions",
        "true",
        "--sample-every",
        "0",
        "--sample-steps",
        "1",
        "--checkpoint-every",
        "0",
    )
    r = cli(*args)
    assert r.rc == 0, r.stderr[-3000:]
    return {"run_dir": run_dir, "instance": instance, "args": args, "first": r, "outputs": json.loads(r.stdout)}


def test_unreadable_picture_types_are_named_in_a_warning(finished_run):
    err = finished_run["first"].stderr
    line = next(x for x in err.splitlines() if "picture types DreamLoom does not read" in x)
    for name in ("animated.gif", "phone photo.HEIC", "scan.tiff", ".jpg", ".png", ".webp"):
        assert name in line, (name, line)
    warnings = [
        json.loads(x)["message"]
        for x in (finished_run["run_dir"] / "events.jsonl").read_text().splitlines()
        if '"warning"' in x
    ]
    assert any("skipped 3 file(s)" in w for w in warnings), warnings


def test_caption_problems_are_warned_about(finished_run):
    err = finished_run["first"].stderr
    assert "caption fabric_01.txt is not valid UTF-8" in err and "replaced with U+FFFD" in err
    assert "caption fabric_02.txt is" in err and "cuts off the end" in err
    assert "Traceback" not in err


def test_a_finished_folder_with_the_same_settings_prints_its_outputs(finished_run):
    run_dir = finished_run["run_dir"]
    before = tree(run_dir / "result")
    r = cli(*finished_run["args"])
    assert r.rc == 0, r.stderr
    assert "already holds the finished result of this run" in r.stderr and "not training again" in r.stderr
    assert json.loads(r.stdout) == finished_run["outputs"]
    assert r.heavy == []  # answered without loading torch, let alone training
    assert tree(run_dir / "result") == before


def test_the_same_run_named_by_other_paths_is_recognised(finished_run, tmp_path):
    """Relative paths from another working folder, and a copy of the same images: still the same run."""
    run_dir, instance = finished_run["run_dir"], finished_run["instance"]
    shutil.copytree(instance, tmp_path / "copied_images")
    rel_run = os.path.relpath(run_dir, tmp_path)
    renamed = {str(run_dir): rel_run, str(instance): "copied_images"}
    r = cli(*[renamed.get(a, a) for a in finished_run["args"]], cwd=tmp_path)
    assert r.rc == 0 and "already holds the finished result of this run" in r.stderr, r.stderr
    outputs = json.loads(r.stdout)
    assert outputs["lora"] == os.path.join(rel_run, "result", "sks_fabric.safetensors")  # as this command names it
    assert all((tmp_path / p).exists() for p in outputs["samples"])


def test_a_finished_folder_is_never_replaced_by_other_settings(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run["run_dir"], run_dir)
    shutil.rmtree(run_dir / "checkpoints")  # what the old error told users to do
    before = tree(run_dir)
    args = [str(run_dir) if a == str(finished_run["run_dir"]) else a for a in finished_run["args"]]
    steps = args.index("--max-train-steps") + 1
    r = cli(*args[:steps], "3", *args[steps + 1 :])
    assert_refused(r, "already holds the finished result of a different run", "max_train_steps", f"{run_dir}-2")
    assert "fix: Pass another --output-dir" in r.stderr
    # Other images, same settings: refused as well.
    other = tmp_path / "other_images"
    shutil.copytree(finished_run["instance"], other)
    Image.new("RGB", (128, 128), "blue").save(other / "fabric_03.png")
    args_other = [str(other) if a == str(finished_run["instance"]) else a for a in args]
    r = cli(*args_other)
    assert_refused(r, "different run", "instance_dir", "the instance images")
    assert tree(run_dir) == before


def test_bench_refuses_a_diffusers_script_it_cannot_run_before_any_work(tmp_path):
    script = tmp_path / "train_dreambooth_lora.py"
    script.write_text("import dreamloom_no_such_module\n")
    run = cli("bench", "--base-model", "tiny", "--compare-diffusers", script, "--json", tmp_path / "b.json")
    assert_refused(run, "import dreamloom_no_such_module failed", "torchvision built for the installed torch")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_dreambooth_lora.py"]


def test_a_lora_or_embedding_that_does_not_fit_the_model_is_refused_naming_both(finished_run, tmp_path):
    """A LoRA trained on `tiny` used on the default tiny-fabric (other widths), or a LoRA given as an embedding,
    was a 170-line traceback from the loaders; now one error naming the file, the model and the fix."""
    lora = Path(finished_run["outputs"]["lora"])
    out = tmp_path / "grid.png"
    r = cli("generate", "--steps", "1", "--prompt", "a fabric", "--lora", lora, "--out", out)
    assert_refused(r, f"{lora.name} does not fit the base model tiny-fabric", "trained on tiny", torch_free=False)
    assert "fix: Pass the model it was trained on as --base-model (tiny)" in r.stderr
    token_prompt = "a dress in the style of <sks-fabric>"
    r = cli("generate", "--base-model", "tiny", "--steps", "1", "--prompt", token_prompt, "--embedding", lora)
    assert_refused(r, f"{lora.name} does not fit the base model tiny", "embeddings to --embedding", torch_free=False)
    assert not out.exists() and not (ROOT / "grid.png").exists()


@pytest.mark.parametrize(
    "command, flag, value, needle",
    [
        ("demo", "--steps", "0", "Invalid value --steps 0"),  # it ran the default 800 steps
        ("demo", "--steps", "-3", "Invalid value --steps -3"),
        ("quality", "--training-seeds", "a,b", "Seed 'a' is not a whole number"),
        ("quality", "--sample-seeds", "", "No seed given"),
        ("quality", "--lora-steps", "-5", "Invalid value --lora-steps -5"),
        ("pretrain-tiny", "--per-family", "0", "Invalid value --per-family 0"),
        ("pretrain-tiny", "--vae-steps", "-1", "Invalid value --vae-steps -1"),
        ("pretrain-tiny", "--threads", "-2", "Invalid value --threads -2"),
    ],
)
def test_lab_commands_check_their_numbers_before_writing(tmp_path, command, flag, value, needle):
    out = tmp_path / "out"
    r = cli(command, "--output-dir", out, flag, value)
    assert_refused(r, needle)
    assert not out.exists()


def test_generate_and_morph_never_replace_a_file_unasked(tmp_path):
    for command, name in (("generate", "grid.png"), ("morph", "loop.gif")):
        out = tmp_path / name
        out.write_bytes(b"the user's picture")
        r = cli(command, "--base-model", "tiny", "--steps", "1", "--out", out)
        assert_refused(r, f"--out {out} already exists", "pass --overwrite to replace it")
        assert out.read_bytes() == b"the user's picture"


def test_an_embedding_whose_token_no_prompt_holds_is_refused(tmp_path):
    """The default prompts hold the LoRA subject, not the embedding's token: the grid would be the base model's."""
    emb = tmp_path / "emb.safetensors"
    emb.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")  # a header only: the token check comes first
    r = cli("generate", "--base-model", "tiny", "--embedding", emb, "--out", tmp_path / "g.png")
    assert_refused(
        r,
        "No prompt contains the token '<sks-fabric>' of the embedding emb.safetensors",
        "in --prompt, or in --subject",
    )
    r = cli("morph", "--base-model", "tiny", "--embedding", emb, "--out", tmp_path / "m.gif")
    assert_refused(r, "No prompt contains the token", "Put <sks-fabric> in --prompt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.safetensors"]


def test_a_stopped_run_with_other_settings_is_refused_naming_them_before_loading(tmp_path):
    """Checkpoints of a stopped run resume only that run: other settings are named, and the way to resume said."""
    from conftest import tiny_config

    from trainer.cli.checks import finished_outputs

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_00002").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00002" / "state.pt").write_bytes(b"x")
    stopped = tiny_config(tmp_path / "images", max_train_steps=10)
    (run_dir / "job.json").write_text(json.dumps({"config": stopped.to_dict(), "dataset_fingerprint": "fp"}))
    assert finished_outputs(run_dir, stopped, "fp") is None  # the same run: it resumes
    changed = tiny_config(tmp_path / "images", max_train_steps=10, learning_rate=2e-4)
    with pytest.raises(Exception) as refused:
        finished_outputs(run_dir, changed, "fp")
    assert "checkpoints of a stopped run with other settings (changed: learning_rate)" in refused.value.message
    assert "Run the same command as before to resume that run" in refused.value.hint
    with pytest.raises(Exception, match="changed: the instance images"):
        finished_outputs(run_dir, stopped, "other pictures")


def test_folders_that_would_mix_outputs_and_images_are_refused(fabric_dir, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(fabric_dir, images)
    before = tree(tmp_path)
    r = cli("train", "--base-model", "tiny", "--output-dir", images, "--instance-dir", images)
    assert_refused(r, "is the folder of the training images", "folder of its own")
    r = cli(*train_args(tmp_path / "run", images, "--class-dir", str(images)))
    assert_refused(r, f"--class-dir {images} is the folder of the training images", "own prior")
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "job.json").write_text("[1, 2]")
    r = cli(*train_args(foreign, images))
    assert_refused(r, "is not a DreamLoom job file", "does not replace files it did not write")
    assert tree(tmp_path) == {**before, "theirs": None, "theirs/job.json": b"[1, 2]"}


def test_the_trainer_refuses_a_job_file_it_did_not_write(tmp_path):
    from trainer.files.job_file import read_job_file

    assert read_job_file(tmp_path / "job.json") == {}
    (tmp_path / "job.json").write_text("not json")
    with pytest.raises(Exception, match="is not a DreamLoom job file"):
        read_job_file(tmp_path / "job.json")


def test_a_resolution_far_from_the_models_is_noted(tmp_path, capsys):
    from trainer.cli import main

    out = tmp_path / "grid.png"
    assert main(["generate", "--base-model", "tiny", "--steps", "1", "--prompt", "a cloth", "--resolution", "256",
                 "--out", str(out)]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "note: --resolution 256 is far from the model's native 64 px: expect repeated subjects" in err, err
    assert out.stat().st_size > 0  # a note, not a refusal: some want it


def test_library_noise_is_hidden_and_other_warnings_are_kept():
    import logging
    import warnings

    from trainer.base_models.offline import hide_known_noise

    hide_known_noise()
    hide_known_noise()  # idempotent: one filter per message
    imports = logging.getLogger("transformers.utils.import_utils")
    models = logging.getLogger("diffusers.models.modeling_utils")
    resizing = logging.getLogger("transformers.modeling_utils")
    ours = [
        [f for f in logger.filters if type(f).__name__ == "_DropMessages"] for logger in (imports, models, resizing)
    ]
    assert [len(filters) for filters in ours] == [1, 1, 1]  # diffusers adds a filter of its own

    def shown(logger, message: str) -> bool:  # the logger's own filters decide (diffusers does not propagate)
        return bool(logger.filter(logger.makeRecord(logger.name, logging.WARNING, __file__, 1, message, None, None)))

    assert not shown(imports, "`CLIPImageProcessor` requires torchvision (not installed); falling back to `...Pil`")
    assert not shown(models, "There are modules in AutoencoderKL that should be kept in float32: []. Casting")
    assert shown(models, "There are modules in UNet that should be kept in float32: ['norm']. Casting")
    assert shown(imports, "Some other warning")
    resized = "The new embeddings will be initialized from a multivariate normal distribution that has old embeddings'"
    assert not shown(resizing, resized + " mean and covariance. As described in this article: https://...")
    assert shown(resizing, "Some weights of CLIPTextModel were not initialized from the model checkpoint")
    with warnings.catch_warnings(record=True) as seen:
        hide_known_noise()  # inside catch_warnings, whose filters it resets
        warnings.warn("Already found a `peft_config` attribute in the model.", UserWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["something else"]
