#!/usr/bin/env bash
# The train step's MFU on one GPU (docs/scaling.md, "MFU on one GPU"), every check in one run of
# about 9 minutes on an H200 or H100: one JSON line per variant, on the terminal and in
# $OUT/device_check.jsonl (default /tmp/device_check), most important first.
#   1-3. configs/paper_day.py as it trains (remat full, official dropout positions, Threefry
#        masks); with remat none; and with hash dropout masks as well (bench/train_step.py:
#        step time, clips/s, model FLOP/s, MFU, peak memory, the ten costliest ops).
#   4.   the attention alone at paper_day's shape: the model's XLA form against cuDNN's fused
#        kernel, with and without cuDNN's dropout (bench/attention.py).
#   5.   remat none with dropout after the branches and cuDNN flash attention: what a fused
#        kernel would give the step (not the official dropout position).
#   6.   a paper_single layer stack (24 x 1024, 16 heads) at the batch one of 8 GPUs holds (8).
# The device image has jax, flax, optax and orbax but not what the bench also imports. Before the
# call, in the checkout's root on a host with network:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     ml_collections==1.1.0 librosa==0.11.0 soundfile audioread decorator pooch platformdirs \
#     soxr cffi pycparser
# then run `bash bench/device_check.sh` there with .whl carried and a 600 s limit.
set -uo pipefail
out=${OUT:-/tmp/device_check}
mkdir -p "$out"
if compgen -G '.whl/*.whl' >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__)'
python3 -c 'import jax; print(jax.devices())'

bench() {  # the paper_day step with config overrides KEY=VALUE
  timeout "${VARIANT_SECONDS:-170}" python3 bench/train_step.py --configs paper_day --no-torch \
    --no-fog-a --profile --rounds 3 --steps 3 "${@/#/--set=}" 2>>"$out/stderr.log" \
    | tee -a "$out/device_check.jsonl"
}
bench
bench model.remat=none
bench model.remat=none model.dropout_rng=hash
timeout 120 python3 bench/attention.py 2>>"$out/stderr.log" | tee -a "$out/device_check.jsonl"
bench model.remat=none model.dropout_positions=branch model.attention=cudnn
bench model.num_layers=24 model.width=1024 model.num_heads=16 model.token_dim=1024 \
  model.remat=none batch_size=8
echo "device_check: $(wc -l <"$out/device_check.jsonl") lines in $out/device_check.jsonl"
