#!/usr/bin/env bash
# GPU check of the fast path on a machine WITHOUT network: training throughput (plain PyTorch
# against kdbench's engine, packs included) and a short paper-protocol-like sweep on a EuroSAT
# subset; prints the GPU, images/s and test accuracies.  About 3-5 minutes on one H100 with the
# defaults (an estimate: not yet run on a GPU; budget 8 minutes).
#
#   bash benchmarks/gpu_check.sh [DATA_ROOT] [RESULTS]   # defaults: .device-data, then $OUT, else $WORK
#
# RESULTS receives the small files: throughput.json and sweep_results.json (one row per trial).
# Checkpoints and the sweep's store stay in the scratch folder WORK (/tmp/kdbench-gpu-check).
#
# DATA_ROOT must hold eurosat/<class>/<image>.  Make a subset (<= 50 MB) on a machine with the
# datasets, from the repository root (500 images per class of the 10: about 25 MB):
#
#   python - <<'EOF'
#   import shutil
#   from pathlib import Path
#   src, dst = Path("../shared/datasets/eurosat"), Path(".device-data/eurosat")
#   for cls in sorted(p for p in src.iterdir() if p.is_dir()):
#       (dst / cls.name).mkdir(parents=True, exist_ok=True)
#       for f in sorted(cls.iterdir())[:500]:
#           shutil.copy2(f, dst / cls.name / f.name)
#   EOF
#   du -sh .device-data
#
# .device-data/ is git-ignored: send it along with the tree explicitly (e.g. the device tool's
# carry: [".device-data"]).
#
# Nothing is downloaded or pip-installed, except wheels found in .whl/ (installed with
# --no-index).  fvcore may be missing there: the sweep then stores no complexity for its trials
# (null), and this script skips the report (--no-report).
#
# Settings (environment): DEVICE (cuda; cpu for a dry run), RESOLUTION (64), BATCH (128),
# STEPS (30), WARMUP (5), PACKS (4,8), TEACHER (vgg16, the throughput teacher), COMPILE (0; 1 adds
# a torch.compile'd pack row), TEACHER_MODEL (vgg16), TEACHER_EPOCHS (12), STUDENT_EPOCHS (12),
# IMAGES_PER_CLASS (all), PACK (0 = the sweep's automatic packing; 1 = no packing).
# A CPU dry run at toy sizes:
#   DEVICE=cpu RESOLUTION=32 BATCH=4 STEPS=1 WARMUP=1 PACKS=2 TEACHER=resnet18 TEACHER_MODEL=resnet18 \
#     TEACHER_EPOCHS=1 STUDENT_EPOCHS=1 IMAGES_PER_CLASS=6 bash benchmarks/gpu_check.sh DATA RESULTS
set -euo pipefail

cd "$(dirname "$0")/.."
DATA_ROOT=${1:-.device-data}
WORK=${WORK:-/tmp/kdbench-gpu-check}
RESULTS=${2:-${OUT:-$WORK}}
DEVICE=${DEVICE:-cuda}
RESOLUTION=${RESOLUTION:-64}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" KDBENCH_NO_DOWNLOAD=1 PYTHONUNBUFFERED=1

stage() { echo; echo "== $* ($(date +%H:%M:%S), ${SECONDS}s)"; }

stage "machine"
if [[ "$DEVICE" == cuda ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"
if compgen -G ".whl/*.whl" >/dev/null; then
    python -m pip install --quiet --no-index --find-links .whl .whl/*.whl || echo "warning: installing the wheels in .whl/ failed; going on without them"
fi
[[ -d "$DATA_ROOT/eurosat" ]] || { echo "no $DATA_ROOT/eurosat/<class>/ folders: make the subset as the header says" >&2; exit 2; }
echo "data: $(find "$DATA_ROOT/eurosat" -type f | wc -l) images in $(du -sh "$DATA_ROOT/eurosat" | cut -f1)"
mkdir -p "$WORK" "$RESULTS"

stage "throughput"
compile_flag=()
[[ "${COMPILE:-0}" == 1 ]] && compile_flag=(--compile)
python benchmarks/throughput.py --device "$DEVICE" --resolution "$RESOLUTION" --batch-size "${BATCH:-128}" \
    --steps "${STEPS:-30}" --warmup "${WARMUP:-5}" --packs "${PACKS:-4,8}" --teacher "${TEACHER:-vgg16}" \
    --json "$RESULTS/throughput.json" "${compile_flag[@]}"

stage "sweep: paper protocol on the EuroSAT subset, from scratch, ${RESOLUTION} px, seed 0"
sweep_args=(--config ablations/paper.toml --set 'grid.datasets=["eurosat"]' --set 'grid.seeds=[0]'
    --set 'teacher.pretrained="none"' --set 'student.pretrained="none"'
    --set "teacher.model=\"${TEACHER_MODEL:-vgg16}\"" --set "teacher.epochs=${TEACHER_EPOCHS:-12}"
    --set "student.epochs=${STUDENT_EPOCHS:-12}" --set "data.resolution=$RESOLUTION"
    --set "run.device=\"$DEVICE\"" --set "run.pack=${PACK:-0}"
    --data-root "$DATA_ROOT" --no-download --no-report --out "$WORK/sweep")
[[ -n "${IMAGES_PER_CLASS:-}" ]] && sweep_args+=(--set "data.images_per_class=$IMAGES_PER_CLASS")
sweep_status=0
python -m kdbench.sweep "${sweep_args[@]}" || sweep_status=$?

stage "results"
python - "$WORK" "$RESULTS" <<'EOF'
import json
import sys
from pathlib import Path

work, results = Path(sys.argv[1]), Path(sys.argv[2])
rows = []
for path in sorted((work / "sweep" / "trials").glob("*/metrics.json")):
    r = json.loads(path.read_text())
    c = r["config"]
    rows.append({"key": r["key"], "method": c["method"], "model": c["recipe"]["model"], "T": c["loss"]["temperature"],
                 "best_test_accuracy": r["best"]["test"]["accuracy"], "last_test_accuracy": r["last"]["test"]["accuracy"],
                 "train_images_per_s": r["timings"]["train_images_per_s"], "total_s": r["timings"]["total_s"],
                 "pack": r.get("pack")})
rows.sort(key=lambda r: (r["method"] != "teacher", r["method"]))
(results / "sweep_results.json").write_text(json.dumps(rows, indent=1))
print(f"{'method':<10} {'model':<13} {'T':>4} {'best test acc':>13} {'last test acc':>13} {'train img/s':>11} {'total s':>8}")
for r in rows:
    print(f"{r['method']:<10} {r['model']:<13} {r['T']:>4g} {r['best_test_accuracy']:>13.4f} "
          f"{r['last_test_accuracy']:>13.4f} {r['train_images_per_s']:>11.0f} {r['total_s']:>8.1f}")
bench = json.loads((results / "throughput.json").read_text())
print(f"\nthroughput on {bench['device_name']} ({bench['resolution']} px, batch {bench['batch_size']}):")
for row in bench["rows"]:
    print(f"  {row['name']:<32} {row['images_per_s']:>9.0f} images/s  x{row['ratio_to_plain_student']:.2f} of the plain student")
EOF
stage "done"
exit "$sweep_status"  # non-zero when a trial failed (see its error in the sweep output above)
