#!/usr/bin/env bash
# The GPU checks of the speed targets, in one call (about 8 minutes on an H100/H200): run on the GPU machine
# from the repository root with .gpu (bench/gpu/bundle.sh) carried, results to $OUT (or ./gpu-out).
#   SmolLM2-1.7B shape, random weights, 256 legal examples: ours vs HF Trainer bf16 + length grouping, 3 runs each;
#   ours with a token budget and packing; SmolLM2-135M shape, the same pair, 1 run each.
# DRY=1 runs the same steps with 2-layer models and a few examples (a CPU smoke test of the script).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT" /tmp/cft-site /tmp/cft-data
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/cft-site .gpu/wheels/*.whl
tar xzf .gpu/data/licenses.tgz -C /tmp/cft-data
export PYTHONPATH=/tmp/cft-site:/tmp/cft-data PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee "$OUT/device.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$OUT/device.txt" 2>/dev/null || true
if [ "${DRY:-0}" = 1 ]; then
  layers=(--layers 2); small=(--examples 16 --batch-size 8); big=(--examples 16 --batch-size 8); repeat=1
else
  layers=(); small=(--examples 256 --batch-size 16); big=(--examples 256 --batch-size 8); repeat=3
fi
B="python3 bench/throughput.py --tokenizer .gpu/tokenizer"
rm -rf /tmp/cft-r17
$B --arch smollm2-1.7b "${layers[@]}" --save-random /tmp/cft-r17 "${big[@]}" --repeat $repeat \
  --json "$OUT/gpu-1.7b.json" 2>&1 | tee "$OUT/log.txt"
$B --model /tmp/cft-r17 "${big[@]}" --set train.max_tokens=4096 --set train.packing=true \
  --json "$OUT/gpu-1.7b-packed.json" 2>&1 | tee -a "$OUT/log.txt"
$B --arch smollm2-135m "${layers[@]}" "${small[@]}" --json "$OUT/gpu-135m.json" 2>&1 | tee -a "$OUT/log.txt"
grep -h "real tokens/s\|^ours \|^baseline \|^device\|measured dense" "$OUT/log.txt" || true
