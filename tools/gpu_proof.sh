#!/usr/bin/env bash
# The GPU proof in one command, on a machine with an NVIDIA GPU and the pack's requirements installed:
#   tools/gpu_proof.sh [tests|bench|all] [OUT_DIR] [PATH/TO/train_dreambooth_lora.py]
# tests: `python -m trainer doctor` and `pytest -m cuda tests` (every test marked cuda: SD1.5 at 512 px and SDXL at
#        1024 px in fp16/bf16 with their budgets, the full fine-tune, kept fp16 convs on the GPU).
# bench: `python -m trainer bench` on a random-weight full-size SD1.5 at 512 px in fp16, with and without
#        gradient checkpointing and with cudnn_benchmark, next to diffusers' own example script when its path is
#        given.
# Logs and JSON results go to OUT_DIR (default build/gpu_proof).
set -uo pipefail
stage=${1:-all}
out=${2:-build/gpu_proof}
script=${3:-}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0

if [[ $stage == tests || $stage == all ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
    $python -m trainer doctor 2>&1 | tee "$out/doctor.txt" || status=1
    $python -m pytest -m cuda -v -s -p no:cacheprovider tests 2>&1 \
        | tee "$out/cuda_tests.log" || status=1
fi

if [[ $stage == bench || $stage == all ]]; then
    model=${SD15_CHECKPOINT:-/tmp/dreamloom-sd15-random.safetensors}
    [[ -f $model ]] || PYTHONPATH=.:tests${PYTHONPATH:+:$PYTHONPATH} $python -m helpers.sd15_layout "$model"
    compare=()
    [[ -n $script ]] && compare=(--compare-diffusers "$script")
    # the shipped defaults with and without checkpointing, then the opt-in cuDNN algorithm search
    for variant in "" --gradient-checkpointing --cudnn-benchmark; do
        name=bench_fp16${variant:+_${variant#--}}
        rm -f "$out/$name.json"
        $python -m trainer bench --base-model "$model" --resolution 512 --mixed-precision fp16 $variant \
            --steps "${BENCH_STEPS:-20}" --warmup 5 --repeats "${BENCH_REPEATS:-2}" --skip-morph "${compare[@]}" \
            --json "$out/$name.json" 2>&1 | tee "$out/$name.log" || status=1
    done
fi
exit $status
