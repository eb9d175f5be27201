#!/bin/sh
# Continue training the bundled model on a GPU machine that has PyTorch but no package index
# (a lent device machine: run it there from the repository root, carrying .wheels/).
#
#   make gpu-wheels                                         # here, once: MONAI and nibabel wheels
#   sh VertebraIDTrain/scripts/train_on_gpu_machine.sh 8    # there: 8 minutes of training
#
# Installs the carried wheels, trains with VertebraIDTrain/configs/phantoms_gpu.toml (it starts
# from the bundled model) for MINUTES, and leaves in $OUT (default out/gpu): the training log,
# model.json and the weights split into parts under 15 MB (a device call returns files of at most
# 16 MiB). Back here: cat model.safetensors.part-* > model.safetensors; loading checks its SHA-256.
# CONFIG, PYTHON and RUN_DIR override the recipe, the interpreter and where the run is written.
set -eu
minutes=${1:?usage: train_on_gpu_machine.sh MINUTES [more vertebraid train options]}
shift
python=${PYTHON:-python3}
config=${CONFIG:-VertebraIDTrain/configs/phantoms_gpu.toml}
run_dir=${RUN_DIR:-runs/gpu_machine}
out=${OUT:-out/gpu}
mkdir -p "$out"

if ! "$python" -c "import monai, nibabel" 2>/dev/null; then
    "$python" -m pip install --quiet --no-deps --no-index .wheels/*.whl
fi
"$python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.cuda.is_available())"

status=0
PYTHONPATH="VertebraID${PYTHONPATH:+:$PYTHONPATH}" "$python" -m VertebraIDLib.cli train "$config" \
    --output-dir "$run_dir" --max-minutes "$minutes" "$@" > "$out/train.log" 2>&1 || status=$?
tr "\r" "\n" < "$out/train.log" | grep -v "it/s" | tail -n 12
if [ -f "$run_dir/model.safetensors" ]; then
    cp "$run_dir/model.json" "$out/model.json"
    split -b 15m "$run_dir/model.safetensors" "$out/model.safetensors.part-"
    ls -l "$out"
fi
exit $status
