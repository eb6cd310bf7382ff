#!/usr/bin/env bash
# GPU path check, run on a lent GPU machine (see benchmarks/README.md, "GPU").
# Python packages the GPU image lacks (ml_collections, grain, tfds, array_record,
# tensorboardX and their small dependencies) travel as wheels in .whl/, fetched with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     ml_collections==1.1.0 grain==0.2.18 tensorflow-datasets==4.9.10 array_record==0.8.6 \
#     tensorboardX==2.6.5 dm-tree==0.1.10 immutabledict==4.3.1 simple-parsing==0.1.9 \
#     tensorflow-metadata==1.21.0 termcolor==3.3.0 toml==0.10.2 docstring-parser portpicker \
#     googleapis-common-protos==1.76.0
#   pip wheel --no-deps -w .whl promise==2.3        # sdist only on PyPI
# Every step is independent and time-boxed; logs land in $OUT (or /tmp/gpu_check).
#   bash benchmarks/gpu_check.sh                      # all steps
#   bash benchmarks/gpu_check.sh default_run          # only the named steps
set -u
WANT=" ${*:-tests train_bench decode_bench default_run} "
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
nvidia-smi -L
python3 -c "import jax, flax, optax, orbax.checkpoint as ocp; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"

step() { local name=$1 t=$2; shift 2; [[ $WANT == *" $name "* ]] || return 0
  echo "=== $name"; local s=$(date +%s)
  timeout "$t" "$@" >"$OUT/$name.log" 2>&1; local rc=$?
  echo "=== $name rc=$rc in $(( $(date +%s) - s )) s"
  tr "\r" "\n" <"$OUT/$name.log" | grep -v "^train: " | tail -n 25 | cut -c1-400; }

# Numerics against float64 references on the GPU: full-precision matmuls (the GPU
# default for float32 dots is TF32, about 1e-3 relative).
JAX_DEFAULT_MATMUL_PRECISION=highest step tests 240 python3 -m pytest -q -p no:cacheprovider \
  tests/test_attention.py tests/test_positions.py tests/test_dropout.py tests/test_decoding.py \
  tests/test_models.py
step train_bench 120 python3 benchmarks/train_throughput.py --systems ours --warmup 3 --rounds 3 --steps-per-round 10 --out "$OUT/train_gpu.json"
step decode_bench 100 python3 benchmarks/decode_speed.py --systems ours --warmup 2 --rounds 3 --steps-per-round 5 --out "$OUT/decode_gpu.json"
# End to end: the embedded default (tokenizer, grain loader, jit step, Orbax, greedy BLEU).
step default_run 240 python3 train.py --workdir=/tmp/run_default
