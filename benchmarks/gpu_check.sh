#!/usr/bin/env bash
# The CUDA path end to end on one GPU, timed: the check to run on a machine with a GPU.
#   bash benchmarks/gpu_check.sh DATA_DIR OUT [STEP ...]     (default: digits amp mnist)
#   digits  the quick default (embedded digits) with +FT and capped +FT rows added, on cuda, fp32 (≤ 300 s)
#   amp     MNIST VQ-VAE (4x4, K = 512) for 2 epochs with bf16 autocast + torch.compile, then fp16 autocast
#           (GradScaler), and its prior for 2 epochs with bf16
#   mnist   configs/mnist-ft-2h-cpu.yaml on cuda with --jobs 2 (≤ $MNIST_SECONDS, default 300): whole if it fits,
#           else the stages it reached (the run resumes)
# Each step prints one JSON line (exit code, seconds); its log and report land in OUT.
set -uo pipefail
data=$1 out=$2; shift 2
steps=${*:-digits amp mnist}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
python3 -c "import json, torch; print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda,
  'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None}))"

step() {  # step NAME LIMIT CMD...: run CMD under LIMIT seconds into OUT/NAME.log; print its exit code and wall time
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}"
  [ $rc -eq 0 ] || tail -c 2000 "$out/$name.log"
}

digits() {
  python3 - <<'PY'
import yaml
cfg = yaml.safe_load(open("configs/digits-quick.yaml"))
for m in cfg["models"]:
    if m["name"] == "2x2":
        m.update(ft_strategies=["sample", "beam"], ft_std_max=[0.125], ft_std_max_N=[1024])
yaml.safe_dump(cfg, open("/tmp/digits-ft.yaml", "w"), sort_keys=False)
PY
  step digits-cuda 300 python3 -m vq2pc run --config /tmp/digits-ft.yaml --device cuda --out /tmp/gpu/digits
  cp /tmp/gpu/digits/report.md "$out/digits-report.md" 2>/dev/null
}

amp() {
  local vq=(--dataset mnist --data-dir "$data" --device cuda --epochs 2 --grid 4 4 --K 512 --D 64 --quantizer vq
            --quantizer-opt kmeans_init=true --batch-size 128)
  step vqvae-bf16-compile 150 python3 -m vq2pc train-vqvae "${vq[@]}" --amp bf16 --compile --out /tmp/gpu/vq-bf16.pt
  step vqvae-fp16 100 python3 -m vq2pc train-vqvae "${vq[@]}" --amp fp16 --quantizer ema --out /tmp/gpu/vq-fp16.pt
  step prior-bf16 100 python3 -m vq2pc train-prior --vqvae /tmp/gpu/vq-bf16.pt --dataset mnist --data-dir "$data" \
    --device cuda --epochs 2 --batch-size 256 --amp bf16 --out /tmp/gpu/prior-bf16.pt
}

mnist() {
  step mnist-ft-2h-cuda "${MNIST_SECONDS:-300}" python3 -m vq2pc run --config configs/mnist-ft-2h-cpu.yaml \
    --device cuda --data-dir "$data" --out /tmp/gpu/mnist --jobs 2
  cp /tmp/gpu/mnist/helper.log "$out/mnist-helper.log" 2>/dev/null
  cp /tmp/gpu/mnist/report.md "$out/mnist-report.md" 2>/dev/null
}

for s in $steps; do "$s"; done
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
