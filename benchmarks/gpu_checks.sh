#!/usr/bin/env bash
# The GPU checks, as one short script (about 8 minutes on one H200): the CUDA tests, throughput
# fp32 and bf16 side by side with the naive loop and the compute limit, and torchrun with NCCL.
# Run from the checkout's root on a machine with a CUDA device:
#     OUT=/tmp/gpu bash benchmarks/gpu_checks.sh
# Uses the python3 on the PATH (torch, torchvision, h5py, pillow, typer, tqdm, pytest,
# hypothesis); the package is imported from the checkout, not installed.
set -uo pipefail
OUT=${OUT:-/tmp/spp-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
step() { echo; echo "=== $* ($(date +%T))"; }

step environment
nvidia-smi -L
python3 -c "import torch, torchvision, sys; print(sys.version.split()[0], torch.__version__, torchvision.__version__, torch.cuda.get_device_name(), torch.version.cuda)"
nproc

step "CUDA tests"
timeout 240 python3 -m pytest -p no:cacheprovider tests/test_gpu.py -rA 2>&1 | tail -15

step "throughput bf16 (resnet50, 128 generated photos)"
timeout 150 python3 benchmarks/throughput.py --device cuda --precision bf16 --images 128 --workers 12

step "torchrun, NCCL, 1 rank == one process"
python3 examples/make_examples.py "$OUT/img" >/dev/null
timeout 120 python3 -m spp_extract extract "$OUT/img" -o "$OUT/one.h5" --weights none --device cuda -q --overwrite
timeout 120 python3 -m torch.distributed.run --nproc-per-node=1 -m spp_extract extract "$OUT/img" -o "$OUT/nccl.h5" \
    --weights none --device cuda -q --overwrite
python3 - "$OUT" <<'EOF'
import sys
import numpy as np
from spp_extract import read_features
a, b = (read_features(f"{sys.argv[1]}/{n}.h5") for n in ("one", "nccl"))
assert list(a.paths) == list(b.paths), "paths differ"
err = float(np.abs(a.features - b.features).max() / np.abs(a.features).max())
print(f"nccl 1 rank: {len(b.paths)} rows, same paths, max rel diff {err:.2e}")
EOF

step "torchrun, 2 ranks on 1 GPU (NCCL cannot put two ranks on one device: a one-line refusal)"
timeout 120 python3 -m torch.distributed.run --nproc-per-node=2 -m spp_extract extract "$OUT/img" -o "$OUT/two.h5" \
    --weights none --device cuda -q --overwrite 2>&1 | grep -v "^\(W\|I\)[0-9]" | tail -8
echo "exit ${PIPESTATUS[0]}"

# The long ones last: a session whose device time runs out still has the checks above.
step "small images (resnet18, 2000 of 32-256 px), padded vs same-size"
timeout 200 python3 benchmarks/throughput.py --device cuda --backbone resnet18 --corpus small \
    --images 2000 --workers 12 --compare-batching

step "throughput fp32, padded vs same-size (resnet50, 256 generated photos)"
timeout 240 python3 benchmarks/throughput.py --device cuda --compare-batching --images 256 --workers 12
