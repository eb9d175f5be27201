# Two commands on a fresh machine:  `make run` (set up + main job)  and  `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
OUT ?= out
# The main job's default input: a synthetic CT (T1..S2, 2 mm) generated from a fixed seed that
# no training, validation or test set uses; its true body centres are written beside it.
EXAMPLE_SEED := 3000000
EXAMPLE_CASE := example_$(EXAMPLE_SEED)

.PHONY: setup run test bench gpu-wheels clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[slicer,train,test]'
	touch $@

# The main job: the bundled model finds and labels the vertebrae of the example CT; then they are scored.
run: setup
	$(VENV)/bin/vertebraid phantom --seed $(EXAMPLE_SEED) --prefix example_ --levels T1..S2 --spacing 2 \
		--transitional none -q -o $(OUT)/input
	$(VENV)/bin/vertebraid detect $(OUT)/input/$(EXAMPLE_CASE)_ct.nii.gz -o $(OUT) --overwrite
	$(VENV)/bin/vertebraid evaluate --pred $(OUT)/$(EXAMPLE_CASE).vertebrae.json --gt $(OUT)/input/$(EXAMPLE_CASE).vertebrae.json

test: setup
	$(PY) -m pytest -q -n 2 Testing/Python

bench: setup
	$(PY) bench/ablation.py --cases 200 --seed 0 --workers 2
	$(PY) bench/vid_label_points.py --workers 2
	$(PY) bench/timing.py

# Wheels a lent GPU machine (PyTorch, no package index) needs to train: carry .wheels there and
# run VertebraIDTrain/scripts/train_on_gpu_machine.sh (see the model card).
gpu-wheels: setup
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: -d .wheels monai==1.6.1 nibabel==5.4.2

clean:
	rm -rf $(OUT) .pytest_cache
