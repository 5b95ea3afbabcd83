#!/usr/bin/env bash
# Issue 36 section 4: JPEG decoding on the GPU (nvjpeg, indexing/gpu_decode.py) against the CPU
# decode workers, end to end vs model-only, on small JPEGs and camera-sized ones, as ONE prepared
# device run. Prepare on this machine (the device machine cannot reach /work/shared):
#
#   bash benchmarks/gpu/run_decode.sh --prepare        # copies 500 flickr8k-test JPEGs to .devcarry/images
#
# then run on the lent GPU (repository root; carry .devcarry), ~6-8 minutes on an H200:
#
#   bash benchmarks/gpu/run_decode.sh "$OUT"
#
# It writes $OUT/gpu-decode-off.json (today's CPU decoders) and $OUT/gpu-decode-on.json (nvjpeg);
# copy them to benchmarks/gpu/ and render each with
#   python benchmarks/bench_gpu.py --render benchmarks/gpu/gpu-decode-on.json --note "..."
# Goals (issue 36): small JPEGs end-to-end >= 0.9 x model-only; camera-sized >= 3x today's rate
# (240-550 images/s in h200-run1.json).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ "${1:-}" == "--prepare" ]]; then
    mkdir -p .devcarry/images
    ls ../shared/data/flickr8k-test/images/*.jpg | sort | head -500 | xargs -I{} cp {} .devcarry/images/
    exit 0
fi
out=${1:?usage: run_decode.sh OUT_DIR (or --prepare)}
python -c "import torch, torchvision; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, torchvision.__version__, torch.cuda.get_device_name(0))"
for mode in on off; do  # nvjpeg first: it is the figure this run exists for
    timeout 280 python benchmarks/bench_gpu.py --data .devcarry/images --images 500 --n 4000 --camera 500 \
        --models ViT-B-32,vlsearch-small --workers 15 --repeats 1 --gpu-decode "$mode" \
        --json "$out/gpu-decode-$mode.json" || echo "mode $mode stopped early (partial JSON kept)"
done
