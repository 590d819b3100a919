#!/usr/bin/env bash
# Train the prior shipped as priors/default: the e2v prior on every preprocessed clip except the
# held-out adaptation target (TARGET, never seen by the prior), validating on one more identity
# (HOLDOUT, also left out of training). Uses every GPU it is given (torchrun when more than one).
#
# Here (CPU), once (clips at 256², ≤200 frames each, to fit the 64 MiB carry):
#   python -m bench.staging shrink $(ls -d out/clips/* | grep -v macron_50s) -o out/carry/prior --size 256 --max-frames 200 --drop-audio
# There (device tool, nvidia-h100-x1 or nvidia-h200; carry [".whl", "out/carry/prior"]):
#   STEPS=4000 bash bench/train_default_prior.sh          # RESUME=1 continues an interrupted run; PRESET=file.yaml overrides settings
# Back here: cp <files_at>/default/* priors/default/      (e2v_grid.png beside it shows real people: never commit it)
# On a machine with the clips at hand: DATA=out/clips bash bench/train_default_prior.sh
set -euo pipefail
STEPS=${STEPS:-4000}
TARGET=${TARGET:-macron_50s_512_30fps}
HOLDOUT=${HOLDOUT:-obama_20s_450_25fps}
DATA=${DATA:-out/carry/prior}
RESULTS=${OUT:-out/default_prior}
DEST=$RESULTS/default
RUN=out/prior_default
mkdir -p "$DEST"

if [ -d .whl ] && command -v nvidia-smi >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
# the head model reads mediapipe's canonical mesh from face_landmarker.task; the pack carries a copy
if [ -f "$DATA/face_landmarker.task" ]; then export GGTALKER_FACE_LANDMARKER=${GGTALKER_FACE_LANDMARKER:-$(realpath "$DATA/face_landmarker.task")}; fi
CLIPS=()
for d in "$DATA"/*/; do
  name=$(basename "$d")
  [ "$name" = "$TARGET" ] && continue
  if [ -f "$d/frames.mp4" ]; then  # packed by bench/staging.py shrink: decode the frames
    [ -f "out/gpu_clips/$name/meta.yaml" ] || python3 -m bench.staging unpack "$d" "out/gpu_clips/$name"
    CLIPS+=("out/gpu_clips/$name")
  else
    CLIPS+=("${d%/}")
  fi
done

GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
LAUNCH=(python3)
[ "$GPUS" -gt 1 ] && LAUNCH=(torchrun --standalone --nproc_per_node="$GPUS")
CMD=(-m ggtalker_cli.cli fit-prior "${CLIPS[@]}" -o "$RUN" --parts e2v --holdout "$HOLDOUT" --steps "$STEPS" ${PRESET:+--preset "$PRESET"} --force ${RESUME:+--resume})
echo "${LAUNCH[*]} ${CMD[*]}" > "$RESULTS/command.txt"
"${LAUNCH[@]}" "${CMD[@]}" 2>&1 | tr '\r' '\n' | tail -n 60 > "$RESULTS/train.log"

cp "$RUN/e2v.safetensors" "$RUN/meta.yaml" "$RUN/val_loss.png" "$DEST/"
cp "$RUN/e2v_grid.png" "$RESULTS/e2v_grid_DO_NOT_COMMIT.png"
python3 - "$DEST" "$RESULTS/command.txt" "$TARGET" <<'EOF'
import sys, pathlib, yaml, torch
dest, command, target = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]).read_text().strip(), sys.argv[3]
meta = yaml.safe_load((dest / "meta.yaml").read_text())
e2v = meta["parts"]["e2v"]
clips = [c["name"] for c in meta["clips"]]
seen = sorted({i.replace(" (mirrored)", "") for i in e2v["identities"]})
device = f"{torch.cuda.device_count()}× {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "cpu"
(dest / "README.md").write_text(f"""# Default e2v prior

Trained by `bench/train_default_prior.sh` on {device}, {e2v['steps']} steps, {e2v['train_seconds']} s of training:

    {command}

- Trained on {len(seen)} identities (each also mirrored): {', '.join(seen)}.
- Validation identity (held out, not trained on): {', '.join(e2v['held_out'])}; best validation loss {e2v['best_val_loss']} (head PSNR {e2v['best_val_psnr']} dB) at step {e2v['best_step']}.
- Never seen: {target} (the adaptation target of the prior-vs-scratch benchmark).
- Clips: the project's preprocessed real clips (256², at most ~200 frames each, `bench/staging.py shrink`); {len(clips)} clip folders given.

{len(seen)} identities are far from the paper's thousands: this prior mostly knows where a head's
parts are and copies colours from the reference frames. `ggtalker fit-prior --parts e2v` on a large
corpus (e.g. VFHQ, HDTF) is how to get the paper's generalisation.

{meta['note']}
""")
print((dest / "README.md").read_text())
EOF
ls -la "$DEST"
