# Quickstart: `make run` (the main job on the embedded default) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch; on a GPU machine pick the build for your CUDA, e.g.
#   make setup TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_HUB_DISABLE_PROGRESS_BARS ?= 1

.PHONY: setup run test test-slow lint clean

setup: $(STAMP)

# torch first: a bare `torch` requirement resolved by pip would pull the CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

# The main job: meta-train MEND on the tiny LALM (short schedule; skipped when the export there
# was made by this very recipe, refused when by another), then the single and sequential sweeps
# on SAKE-mini's test split; prints the table and the report path.
QUICKSTART := checkpoints/mend-tiny-sake_mini-quickstart
run: setup
	$(BIN)/python train.py editor=mend experiment=quickstart skip_if_exported=true
	$(BIN)/python evaluate.py ckpt=$(QUICKSTART)

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache *.egg-info
