# Two commands on a fresh machine:  `make run` (set up + main job)  and  `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
OUT ?= out
# The main job's default input: a small real spine CT shipped with the extension (Apache-2.0,
# VertebraID/Resources/SampleData/README.md), its true body centres beside it.
SAMPLE_DIR := VertebraID/Resources/SampleData
SAMPLE := VertebraIDSampleSpineCT

.PHONY: setup run test bench gpu-wheels clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[slicer,train,test]'
	touch $@

# The main job: the bundled model finds and labels the vertebrae of the sample CT; then they are scored.
run: setup
	$(VENV)/bin/vertebraid detect $(SAMPLE_DIR)/$(SAMPLE).nii.gz -o $(OUT) --overwrite
	$(VENV)/bin/vertebraid evaluate --pred $(OUT)/$(SAMPLE).vertebrae.json --gt $(SAMPLE_DIR)/$(SAMPLE).vertebrae.json

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
