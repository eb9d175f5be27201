# Two commands on a fresh machine:  `make run` (set up + main job)  and  `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
OUT ?= out
EXAMPLE := VertebraID/Resources/Examples

.PHONY: setup run test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[slicer,train,test]'
	touch $@

# The main job: label the vertebrae of the bundled example activation maps, then score them.
run: setup
	$(VENV)/bin/vertebraid locate $(EXAMPLE)/example_heatmaps.nii.gz \
		-o $(OUT)/example.vertebrae.json --markups $(OUT)/example.mrk.json --picture $(OUT)/example.png
	$(VENV)/bin/vertebraid evaluate --pred $(OUT)/example.vertebrae.json --gt $(EXAMPLE)/example_truth.vertebrae.json

test: setup
	$(PY) -m pytest -q -n 2 Testing/Python

bench: setup
	$(PY) bench/ablation.py --cases 200 --seed 0 --workers 2
	$(PY) bench/vid_label_points.py --workers 2
	$(PY) bench/timing.py

clean:
	rm -rf $(OUT) .pytest_cache
