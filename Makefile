# dino-ray: two commands do everything on a fresh clone (see README.md).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# Quickstart data: TRAIN_DATA / VAL_DATA if given, else one shard of the shared CIFAR-10 Parquet to pretrain on and
# another held out for k-NN, else the 2,000-image sample this repository carries.
SHARED  := ../shared/datasets/cifar10/train
TRAIN_DATA ?= $(if $(wildcard $(SHARED)/part-00000.parquet),$(SHARED)/part-00000.parquet,data/cifar10_sample/train.parquet)
VAL_DATA   ?= $(if $(wildcard $(SHARED)/part-00004.parquet),$(SHARED)/part-00004.parquet,data/cifar10_sample/val.parquet)
QUICK   ?= outputs/quickstart

.PHONY: venv quickstart test benchmark clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[ray,test,video]"
	touch $@

venv: $(BIN)/.installed

quickstart: venv
	$(BIN)/python -m dino_ray.quickstart --train_data $(TRAIN_DATA) --val_data $(VAL_DATA) --output_dir $(QUICK)

test: venv
	$(BIN)/python -m pytest -x -q --timeout=900 --durations=12 tests

benchmark: venv
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/ray_overhead.py
	$(BIN)/python benchmarks/knn.py
	$(BIN)/python benchmarks/augment.py
	$(BIN)/python benchmarks/input_pipeline.py

clean:
	rm -rf $(QUICK) .pytest_cache
