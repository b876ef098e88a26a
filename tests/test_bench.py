"""`python -m trainer bench`: every contender in its own process, the allocator comparison, and the comparison
with diffusers' example script (here a stand-in that takes the same arguments and prints tqdm-like lines).
No test asserts a speed."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from trainer import cpu_malloc
from trainer.config import TrainConfig
from trainer.lab import bench as B
from trainer.lab import bench_diffusers as D
from trainer.lab import bench_measure as M

RUN_FIELDS = {
    "pid",
    "malloc",
    "step_times",
    "minor_faults",
    "sys_s",
    "user_s",
    "median_step_s",
    "faults_per_step",
    "sys_s_per_step",
    "user_s_per_step",
    "peak_rss",
    "peak_rss_process",
    "peak_cuda",
    "peak_gpu_process",
    "first_step_at_s",
    "process_wall_s",
}
SUMMARY_FIELDS = {
    "timed_steps",
    "median_step_s",
    "steps_per_s",
    "faults_per_step",
    "sys_s_per_step",
    "user_s_per_step",
    "peak_rss_mb",
    "peak_rss_process_mb",
    "peak_cuda_mb",
    "peak_gpu_process_mb",
    "malloc",
}

# Accepts what bench passes to diffusers' train_dreambooth_lora.py (argparse refuses anything else), checks the
# folders the way the real script reads them, records its arguments, and prints a tqdm-like "Steps" bar.
STAND_IN = textwrap.dedent(
    """
    import argparse, json, os, sys, time
    from pathlib import Path

    p = argparse.ArgumentParser()
    for name in ("pretrained_model_name_or_path", "instance_data_dir", "instance_prompt", "class_data_dir",
                 "class_prompt", "output_dir", "lr_scheduler", "mixed_precision", "report_to"):
        p.add_argument("--" + name, required=True)
    for name in ("num_class_images", "seed", "resolution", "train_batch_size", "gradient_accumulation_steps",
                 "max_train_steps", "checkpointing_steps", "rank", "dataloader_num_workers"):
        p.add_argument("--" + name, type=int, required=True)
    for name in ("prior_loss_weight", "learning_rate", "adam_beta1", "adam_beta2", "adam_weight_decay",
                 "adam_epsilon", "max_grad_norm"):
        p.add_argument("--" + name, type=float, required=True)
    for name in ("with_prior_preservation", "center_crop", "gradient_checkpointing"):
        p.add_argument("--" + name, action="store_true")
    a = p.parse_args()
    model = Path(a.pretrained_model_name_or_path)
    assert (model / "model_index.json").is_file() and (model / "unet").is_dir(), model
    for folder in (a.instance_data_dir, a.class_data_dir):
        assert all(f.suffix == ".png" for f in Path(folder).iterdir()), os.listdir(folder)
    assert len(os.listdir(a.class_data_dir)) == a.num_class_images  # so the real script would generate none
    record = Path(__file__).with_name("stand_in_runs.jsonl")
    with open(record, "a") as fh:
        fh.write(json.dumps({"pid": os.getpid(), "args": vars(a), "env_offline": os.environ.get("HF_HUB_OFFLINE"),
                             "glibc": os.environ.get("GLIBC_TUNABLES")}) + "\\n")
    n = a.max_train_steps
    keep = []
    sys.stderr.write(f"Steps:   0%|          | 0/{n} [00:00<?, ?it/s]")
    for i in range(1, n + 1):
        keep.append(bytearray(4 * 2**20))
        time.sleep(0.05)
        bar = f"\\rSteps: {100 * i // n:3d}%|#####     | {i}/{n} [00:01<00:01,  9.00it/s"
        sys.stderr.write(bar + "]")
        sys.stderr.write(bar + ", loss=0.1, lr=1e-4]")  # set_postfix repeats the line
        sys.stderr.flush()
    sys.stderr.write("\\n")
    """
)


def _tunables(value: str | None) -> dict[str, str]:
    return dict(item.partition("=")[::2] for item in (value or "").split(":") if item)


def test_parse_step_line():
    assert D.parse_step_line("Steps:  40%|████      | 2/5 [00:03<00:04,  1.50s/it, loss=0.123, lr=0.0001]") == 2
    assert D.parse_step_line("Steps: 100%|##########| 12/12 [00:09<00:00,  1.3it/s]") == 12
    assert D.parse_step_line("Steps:   0%|          | 0/5 [00:00<?, ?it/s]") == 0
    assert D.parse_step_line("Generating class images: 50%|#####     | 1/2") is None
    assert D.parse_step_line("03/01/2026 12:00:00 - INFO - __main__ - Num examples = 8") is None


def test_per_step_rows_share_a_skipped_step_and_skip_the_warm_up():
    # step -> [time, faults, sys, user]; step 4's line was skipped, so steps 4 and 5 share that interval
    marks = {1: [10.0, 100, 1.0, 2.0], 2: [11.0, 110, 1.5, 3.0], 3: [12.0, 130, 2.0, 4.0], 5: [16.0, 170, 3.0, 8.0]}
    rows = M.per_step_rows(marks, warmup=2)
    assert rows == [[1.0, 20.0, 0.5, 1.0], [2.0, 20.0, 0.5, 2.0], [2.0, 20.0, 0.5, 2.0]]
    assert M.window(marks, 2) == (11.0, 16.0)
    assert M.per_step_rows({1: [0.0, 0, 0.0, 0.0]}, warmup=1) == []


def test_nvidia_smi_lines():
    out = "1234, 5120\n99, 10\n1234, 1024\n"
    assert M.nvidia_smi_used(out, 1234) == 6144 * 2**20
    assert M.nvidia_smi_used(out, 7) is None
    assert M.nvidia_smi_used("No running processes found\n", 7) is None


def test_proc_readers_read_this_process():
    if not os.path.exists("/proc/self/status"):
        pytest.skip("no /proc")
    rss, hwm = M.read_status(os.getpid())
    assert 0 < rss <= hwm
    faults, sys_s, user_s = M.read_counters(os.getpid())
    assert faults > 0 and sys_s >= 0 and user_s > 0
    mark = M.step_mark()
    assert len(mark) == 5 and mark[1] > 0


def test_diffusers_args_match_our_settings():
    cfg = TrainConfig(base_model="tiny", instance_dir="x", resolution=64, rank=4, mixed_precision="no").validate()
    spec = {
        "cfg": cfg.to_dict(),
        "warmup": 2,
        "steps": 3,
        "resolution": 64,
        "diffusers_model": "m",
        "diffusers_instance_dir": "i",
        "diffusers_class_dir": "c",
        "diffusers_class_count": 8,
    }
    args = D.diffusers_args(spec, Path("out"))
    given = dict(zip(args, args[1:]))  # each flag -> the word after it
    assert given["--max_train_steps"] == "5" and int(given["--checkpointing_steps"]) > 5
    assert given["--rank"] == "4" and float(given["--learning_rate"]) == 1e-4
    assert given["--mixed_precision"] == "no" and given["--train_batch_size"] == "1"
    assert given["--num_class_images"] == "8" and given["--resolution"] == "64"
    assert "--with_prior_preservation" in args and "--center_crop" in args
    assert "--validation_prompt" not in args


@pytest.mark.slow
def test_bench_runs_each_contender_in_its_own_process(tmp_path, capsys):
    script = tmp_path / "train_dreambooth_lora.py"
    script.write_text(STAND_IN)
    out = tmp_path / "bench.json"
    report = B.bench(
        "tiny",
        steps=2,
        warmup=1,
        repeats=1,
        morph=True,
        out=str(out),
        malloc="both",  # "all" adds diffusers in our environment: test_contender_plan
        compare_diffusers=str(script),
    )
    saved = json.loads(out.read_text())
    assert saved["contenders"].keys() == report["contenders"].keys()
    names = ["ours", "ours-malloc-default", "tutorial", "unet", "diffusers"]
    assert list(saved["contenders"]) == names
    pids = set()
    for name, c in saved["contenders"].items():
        assert SUMMARY_FIELDS <= c["summary"].keys(), name
        assert len(c["runs"]) == 1
        run = c["runs"][0]
        assert RUN_FIELDS <= run.keys(), name
        assert len(run["step_times"]) == len(run["minor_faults"]) == len(run["sys_s"]) == 2
        assert run["median_step_s"] > 0 and run["user_s_per_step"] >= 0
        if sys.platform.startswith("linux"):
            assert run["peak_rss"] > 0 and run["peak_rss_process"] >= run["peak_rss"]
        pids.add(run["pid"])
    assert len(pids) == len(names) and os.getpid() not in pids

    malloc = {name: c["runs"][0]["malloc"] for name, c in saved["contenders"].items()}
    if sys.platform.startswith("linux") and saved["device"] == "cpu":  # each reports what its environment gave it
        tuned, default = "tuned (GLIBC_TUNABLES)", "default (DREAMLOOM_MALLOC=default)"
        assert malloc == {
            "ours": tuned,
            "ours-malloc-default": default,
            "tutorial": tuned,
            "unet": tuned,
            "diffusers": default,
        }
    assert saved["contenders"]["ours"]["summary"]["phases_ms"].keys() == set(M.PHASES)
    # the floor trains on a batch of ours' shape: instance + class rows of the latents ours feeds the UNet
    assert saved["contenders"]["unet"]["runs"][0]["unet_input"] == saved["contenders"]["ours"]["runs"][0]["unet_input"]
    assert set(saved["ratios"]) == {f"ours/{name}" for name in names[1:]}
    assert saved["ratios"]["ours/diffusers"]["step_time"] > 0 and saved["ratios"]["ours/diffusers"]["peak_rss"] > 0
    assert saved["morph"]["frames"] == 24

    called = [json.loads(line) for line in (tmp_path / "stand_in_runs.jsonl").read_text().splitlines()]
    assert [c["pid"] for c in called] == [saved["contenders"][k]["runs"][0]["pid"] for k in names[4:]]
    for c in called:
        assert c["args"]["max_train_steps"] == 3 and c["args"]["resolution"] == 64
        assert c["args"]["seed"] == TrainConfig.seed and c["env_offline"] == "1"
        assert c["args"]["mixed_precision"] == ("fp16" if saved["device"] == "cuda" else "no")  # --mixed-precision auto
    (plain,) = (_tunables(c["glibc"]) for c in called)
    assert not set(cpu_malloc.TUNED) & set(plain)  # diffusers, the target, runs in the default environment
    printed = capsys.readouterr().out
    assert "ours/diffusers" in printed and "faults/step" in printed and "morph rendering" in printed


def test_bare_unet_floor_uses_the_vae_latent_size():
    """tiny-fabric's three-level VAE makes 32 x 32 latents at 128 px: the floor once used resolution // 8."""
    cfg = TrainConfig(base_model="tiny-fabric", resolution=128).validate()
    spec = {"cfg": cfg.to_dict(), "warmup": 1, "steps": 1, "base_model": "tiny-fabric"}
    assert B._run_bare_unet(spec)["unet_input"] == [2, 4, 32, 32]


def test_bench_refuses_a_missing_script_before_any_work(tmp_path):
    from trainer.errors import DreamLoomError

    with pytest.raises(DreamLoomError, match="no such file"):
        B.bench("tiny", compare_diffusers=str(tmp_path / "nope.py"))
    with pytest.raises(DreamLoomError, match="warmup"):
        B.bench("tiny", warmup=0)
    with pytest.raises(DreamLoomError, match="malloc"):
        B.bench("tiny", malloc="fast")


@pytest.mark.parametrize(
    "malloc, script, expected",
    [
        ("tuned", None, [("ours", "ours", True), ("tutorial", "tutorial", True), ("unet", "unet", True)]),
        (
            "tuned",
            "s.py",
            [
                ("ours", "ours", True),
                ("tutorial", "tutorial", True),
                ("unet", "unet", True),
                ("diffusers", "diffusers", False),
            ],
        ),
        (
            "default",
            "s.py",
            [
                ("ours", "ours", False),
                ("tutorial", "tutorial", False),
                ("unet", "unet", False),
                ("diffusers", "diffusers", False),
            ],
        ),
        (
            "both",
            "s.py",
            [
                ("ours", "ours", True),
                ("ours-malloc-default", "ours", False),
                ("tutorial", "tutorial", True),
                ("unet", "unet", True),
                ("diffusers", "diffusers", False),
            ],
        ),
        (
            "all",
            "s.py",
            [
                ("ours", "ours", True),
                ("ours-malloc-default", "ours", False),
                ("tutorial", "tutorial", True),
                ("unet", "unet", True),
                ("diffusers", "diffusers", False),
                ("diffusers-tuned", "diffusers", True),
            ],
        ),
        (
            "all",
            None,
            [
                ("ours", "ours", True),
                ("ours-malloc-default", "ours", False),
                ("tutorial", "tutorial", True),
                ("unet", "unet", True),
            ],
        ),
    ],
)
def test_contender_plan(malloc, script, expected):
    assert B.contender_plan(malloc, Path(script) if script else None) == expected


def test_contender_env_gives_tuning_from_the_start_or_none_of_ours(monkeypatch):
    # as after `python -m trainer` re-executed itself with our settings, plus one of the user's own
    ours = cpu_malloc.with_tuned_malloc({})["GLIBC_TUNABLES"]
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2:" + ours)
    monkeypatch.setenv(cpu_malloc.OPT_OUT, "default")

    tuned = B.contender_env(True, "cpu")
    assert set(cpu_malloc.TUNED) <= set(_tunables(tuned["GLIBC_TUNABLES"]))
    assert _tunables(tuned["GLIBC_TUNABLES"])["glibc.malloc.arena_max"] == "2"
    assert cpu_malloc.OPT_OUT not in tuned and cpu_malloc.is_tuned(tuned)
    assert tuned["HF_HUB_OFFLINE"] == "1" and str(M.REPO_ROOT) in tuned["PYTHONPATH"]

    default = B.contender_env(False, "cpu")  # e.g. diffusers in mode "tuned", or ours-malloc-default
    assert _tunables(default.get("GLIBC_TUNABLES")) == {"glibc.malloc.arena_max": "2"}
    assert default[cpu_malloc.OPT_OUT] == "default" and not cpu_malloc.wants_tuning(default, cuda=False)

    monkeypatch.setenv("GLIBC_TUNABLES", ours)
    assert "GLIBC_TUNABLES" not in B.contender_env(False, "cpu")
    off_cpu = B.contender_env(True, "cuda")  # training off a CPU is not tuned
    assert "GLIBC_TUNABLES" not in off_cpu and cpu_malloc.OPT_OUT not in off_cpu

    if sys.platform.startswith("linux"):
        assert M.malloc_label("cpu", tuned) == "tuned (GLIBC_TUNABLES)"
        assert M.malloc_label("cpu", default) == "default (DREAMLOOM_MALLOC=default)"
    assert M.malloc_label("cuda", tuned) == "default (not on a CPU)"


def test_bench_cli_passes_precision_and_checkpointing_to_every_contender(monkeypatch, tmp_path):
    from trainer.cli import main

    seen = {}
    monkeypatch.setattr(B, "bench", lambda *args, **kwargs: seen.update(kwargs))
    argv = ["bench", "--mixed-precision", "bf16", "--gradient-checkpointing", "--json", str(tmp_path / "b.json")]
    assert main([*argv, "--half-frozen-convs", "false", "--cudnn-benchmark"]) == 0
    expected = {"mixed_precision": "bf16", "gradient_checkpointing": True, "half_frozen_convs": False}
    assert seen["cfg_overrides"] == {**expected, "cudnn_benchmark": True}
    assert main(["bench", "--json", str(tmp_path / "c.json")]) == 0
    expected = {"mixed_precision": "auto", "gradient_checkpointing": False, "half_frozen_convs": None}  # None: auto
    expected["cudnn_benchmark"] = False
    assert seen["cfg_overrides"] == expected


@pytest.mark.slow
def test_bench_compare_buckets_runs_buckets_against_the_same_images_square(tmp_path, capsys):
    out = tmp_path / "bench.json"
    B.bench("tiny", steps=1, warmup=1, repeats=1, morph=False, out=str(out), malloc="tuned", compare_buckets=True)
    saved = json.loads(out.read_text())
    assert list(saved["contenders"]) == ["ours", "square"] and set(saved["ratios"]) == {"ours/square"}
    assert saved["buckets"] == {
        "ours": "48x80: 3 images, 64x64: 3 images, 80x48: 4 images",  # portrait 2:3, square, landscape 3:2
        "square": "64x64: 10 images",
    }
    assert saved["ratios"]["ours/square"]["step_time"] > 0
    assert "ours/square" in capsys.readouterr().out


def test_script_requirements_are_read_from_the_module_body():
    source = textwrap.dedent(
        """
        import os, torch.nn.functional as F
        from torchvision import transforms
        from . import sibling
        from diffusers.utils import check_min_version
        try:
            import wandb
        except ImportError:
            wandb = None
        if True:
            import xformers
        check_min_version("0.40.0.dev0")

        def main():
            import bitsandbytes
        """
    )
    modules, min_version = D.script_requirements(source)
    assert modules == ["os", "torch.nn.functional", "torchvision", "diffusers.utils"]  # optional imports left out
    assert min_version == "0.40.0.dev0"
    assert D.script_requirements("import os\n") == (["os"], None)
    with pytest.raises(SyntaxError):
        D.script_requirements("def (:\n")


@pytest.mark.parametrize(
    "source, needles",
    [
        ("import dreamloom_no_such_module\n", ["import dreamloom_no_such_module failed with ModuleNotFoundError"]),
        # a torchvision built for another torch fails at import with a RuntimeError, not an ImportError
        ("import fake_torchvision\n", ["RuntimeError: operator torchvision::nms does not exist", "torchvision built"]),
        (
            "from diffusers.utils import check_min_version\ncheck_min_version('999.0.0')\n",
            ["check_min_version('999.0.0') failed with ImportError", "train_dreambooth_lora.py of the installed"],
        ),
        ("def (:\n", ["is not a Python script"]),
    ],
)
def test_bench_refuses_a_script_this_python_cannot_run_before_any_work(tmp_path, monkeypatch, source, needles):
    from trainer.errors import DreamLoomError

    (tmp_path / "fake_torchvision.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    script = tmp_path / "train_dreambooth_lora.py"
    script.write_text(source)

    def no_work(*args, **kwargs):
        raise AssertionError("the bench prepared data before refusing the script")

    monkeypatch.setattr(B, "_prepare_in_process", no_work)
    with pytest.raises(DreamLoomError) as refused:
        B.bench("tiny", compare_diffusers=str(script))
    text = f"{refused.value.message} {refused.value.hint}"
    for needle in needles:
        assert needle in text, text
    assert "\n" not in refused.value.message


def test_bench_runs_a_script_whose_imports_and_version_check_pass(tmp_path):
    """The check passes what the script itself would run: the stand-in, and diffusers' own version check."""
    script = tmp_path / "train_dreambooth_lora.py"
    script.write_text("from diffusers.utils import check_min_version\ncheck_min_version('0.1.0')\n" + STAND_IN)
    D.check_script(script)
