#!/usr/bin/env bash
# The GPU checks of stage one and stage two, as one script for a lent GPU machine (issue: scale).
# Prints the two ratios whose goal is >= 0.95:
#   1. precompute / bare teacher forward passes, resnet50 at 224x224 in bf16 (marginal time);
#   2. a resnet18 student's epoch from stored soft targets against from hard labels;
# stage one's writer against its teacher (issue 22.1, goal >= 0.9; stage_one_writer.py):
#   3. a bf16 resnet50 teacher alone vs precompute, images/s (end to end and marginal);
#   4. trivial teachers on the GPU: C = 100 and 1,000 (rows/s), and top-16 over a 32k
#      vocabulary (positions/s written; goal >= 1 M);
#   5. the writer alone on this host's disk (block_writes.py: write_block against plain files
#      of the same bytes, C = 100 and 1,000) and write_set's top-k rows/s (goal >= 1 M);
# then stage one over 5,000 real JPEGs (~500x375, benchmarks/jpeg_stage_one.py): images/s of
# decoding in CPU workers against decoding on the device (nvJPEG), the teacher, and precompute
# (goal: precompute >= 0.9 of min(decode, teacher)).
# It runs the checkout in place (PYTHONPATH), with the machine's own torch/torchvision; the other
# dependencies (numpy, zarr, h5py, xxhash, click, tqdm, dask) must be importable there, e.g. from
# wheels carried in and installed to a --target directory already on PYTHONPATH.
# Usage: bash benchmarks/gpu_check.sh            (a few minutes on one H100-class GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
$py -c "import torch, softlabels; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
$py benchmarks/precompute_overhead.py --size 224 --model resnet50 --precision bf16 \
    --n 8192 --n-small 1024 --batch-size 256 --device cuda --repeats 3
$py benchmarks/stage_one_writer.py --device cuda --case resnet50 --rows 8192 --rounds 3
$py benchmarks/stage_one_writer.py --device cuda --case dense100 --case dense1000 --case seq \
    --rows 524288 --seq-batch 16 --rounds 3
$py benchmarks/block_writes.py --classes 100 --rows 200000 --rounds 3
$py benchmarks/block_writes.py --classes 1000 --rows 50000 --rounds 3
$py benchmarks/write_set.py --rows 1000000 --rounds 3
$py benchmarks/student_epoch.py --device cuda --size 224 --n 16384 --batch-size 256 --epochs 3
$py benchmarks/jpeg_stage_one.py --device cuda --precision bf16 --files 5000 --per 4096 \
    --rounds 2 --workers 4,8,16 --precompute-workers 16 --decode-device cuda --batch-size 256
