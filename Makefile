# dino-ray: two commands do everything on a fresh clone (see README.md); `make docs` serves the documentation.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# Quickstart data: TRAIN_DATA and VAL_DATA if given, else CIFAR-10's Parquet shards in the data root
# (DINO_RAY_DATA: ../shared/datasets beside this checkout when there, else ~/.cache/dino-ray), else torchvision's
# download (when online), else the 5,000-image sample the package carries (dino_ray/core/data/cifar10.py).
TRAIN_DATA ?=
VAL_DATA   ?=
QUICK   ?= outputs/quickstart
CONFIG  ?= cifar10_cpu
export DINO_RAY_DATA ?= $(if $(wildcard ../shared/datasets/cifar10),$(abspath ../shared/datasets))

.PHONY: venv quickstart test test-fast benchmark time-to-accuracy docs clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[ray,test,video,export,docs]"
	touch $@

venv: $(BIN)/.installed

quickstart: venv
	$(BIN)/dino-ray quickstart $(if $(TRAIN_DATA),--train_data $(TRAIN_DATA)) \
		$(if $(VAL_DATA),--val_data $(VAL_DATA)) --config $(CONFIG) --output_dir $(QUICK)

test: venv
	$(BIN)/python -m pytest -x -q --timeout=900 --durations=12 tests

# The unit tier: no Ray cluster, no MLflow server, no minutes-long training (tests marked slow are left out).
test-fast: venv
	$(BIN)/python -m pytest -x -q --timeout=300 --durations=8 -m "not slow" tests

benchmark: venv
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/ray_tax.py --label now
	$(BIN)/python benchmarks/knn.py
	$(BIN)/python benchmarks/augment.py
	$(BIN)/python benchmarks/input_pipeline.py
	$(BIN)/python benchmarks/dataset_memory.py

# k-NN against training minutes: the shipped recipes, the reference's, and lightly's DINO (the `bench` extra)
time-to-accuracy: venv
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/time_to_accuracy.py

# The documentation site (docs/, mkdocs.yml), served at http://127.0.0.1:8000 with live reload
docs: venv
	$(BIN)/mkdocs serve

clean:
	rm -rf $(QUICK) .pytest_cache
