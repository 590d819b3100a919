#!/usr/bin/env bash
# The e2v prior on GPUs: the same `fit-prior --parts e2v` run on 1 GPU and on 2 GPUs (torchrun,
# DDP over NCCL, one process per GPU, each rank its share of one sample stream), and the 1→2 GPU
# scaling of its throughput (samples/s at a fixed per-GPU batch; warm-up and validation excluded).
#
# Here (CPU), once; the clips shrink to 256² and ≤200 frames each so they fit the 64 MiB carry:
#   python -m bench.staging shrink $(ls -d out/clips/* | grep -v macron_50s) -o out/carry/prior --size 256 --max-frames 200 --drop-audio
# There (device tool, kind nvidia-h200-x2, carry [".whl", "out/carry/prior"]):
#   STEPS=300 PRESET=bench/presets/fit_prior_gpu.yaml bash bench/fit_prior_gpu.sh   (32 samples per GPU and step)
# Comes back in $OUT: fit_prior_scaling.json, the two logs, the 2-GPU prior's val_loss.png.
set -euo pipefail
STEPS=${STEPS:-400}
DATA=${DATA:-out/carry/prior}
HOLDOUT=${HOLDOUT:-obama_20s_450_25fps}
RESULTS=${OUT:-out/bench/fit_prior_gpu}
CLIPS=out/gpu_clips
mkdir -p "$RESULTS" "$CLIPS"

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
# the head model reads mediapipe's canonical mesh from face_landmarker.task; the pack carries a copy
if [ -f "$DATA/face_landmarker.task" ]; then export GGTALKER_FACE_LANDMARKER=${GGTALKER_FACE_LANDMARKER:-$(realpath "$DATA/face_landmarker.task")}; fi
for d in "$DATA"/*/; do
  name=$(basename "$d")
  [ -f "$CLIPS/$name/meta.yaml" ] || python3 -m bench.staging unpack "$d" "$CLIPS/$name"
done
# gsplat builds its CUDA extension on first use (~40 s): do it before anything is timed
python3 -c "from kernels import gsplat_backend as g; r = g.unavailable(); print('gsplat:', r or 'ok'); assert r is None"

ARGS=(fit-prior "$CLIPS"/* --parts e2v --holdout "$HOLDOUT" --steps "$STEPS" ${PRESET:+--preset "$PRESET"} --force)
CUDA_VISIBLE_DEVICES=0 python3 -m ggtalker_cli.cli "${ARGS[@]}" -o out/gpu_prior_1gpu 2>&1 | tr '\r' '\n' | tail -n 40 > "$RESULTS/fit_prior_1gpu.log"
torchrun --standalone --nproc_per_node=2 -m ggtalker_cli.cli "${ARGS[@]}" -o out/gpu_prior_2gpu 2>&1 | tr '\r' '\n' | tail -n 40 > "$RESULTS/fit_prior_2gpu.log"
cp out/gpu_prior_2gpu/val_loss.png "$RESULTS/val_loss_2gpu.png"

python3 - "$RESULTS/fit_prior_scaling.json" <<'EOF'
import json, sys, yaml
runs = {n: yaml.safe_load(open(f"out/gpu_prior_{n}gpu/meta.yaml"))["parts"]["e2v"] for n in (1, 2)}
keys = ("gpu", "world_size", "batch_per_gpu", "steps", "steps_per_second", "samples_per_second", "train_seconds", "best_val_loss", "best_val_psnr")
out = {f"{n}gpu": {k: r[k] for k in keys} for n, r in runs.items()}
out["scaling_samples_per_second"] = round(runs[2]["samples_per_second"] / runs[1]["samples_per_second"], 3)
out["note"] = "throughput at a fixed per-GPU batch (2 GPUs: twice the samples per step); first steps (worker start-up, warm-up) and validation excluded"
json.dump(out, open(sys.argv[1], "w"), indent=2)
print(json.dumps(out, indent=2))
EOF
