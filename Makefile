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
# Each stage's elapsed time is printed at the end (setup counts from when make started).
QUICKSTART := checkpoints/mend-tiny-sake_mini-quickstart
STARTED    := $(shell date +%s)
TIMES      := outputs/make-run-times.tsv
stage = @t=$$(date +%s) && $(2) && echo "$(1)	$$(( $$(date +%s) - t ))" >> $(TIMES)
run: setup
	@mkdir -p outputs && printf 'setup (venv, installs)\t%s\n' $$(( $$(date +%s) - $(STARTED) )) > $(TIMES)
	$(call stage,SAKE-mini build,$(BIN)/python -m datamodules.sake build-mini --out data/sake_mini --if-missing)
	$(call stage,MEND training,$(BIN)/python train.py editor=mend experiment=quickstart skip_if_exported=true)
	$(call stage,sweeps (single + sequential),$(BIN)/python evaluate.py ckpt=$(QUICKSTART))
	@awk -F'\t' '{ printf "  %-30s %3dm%02ds\n", $$1, $$2 / 60, $$2 % 60; s += $$2 } \
	  END { printf "  %-30s %3dm%02ds\n", "make run, in all", s / 60, s % 60 }' $(TIMES) \
	  | sed '1i make run: elapsed time per stage'

# One pytest worker per core (pytest-xdist), a test file per worker at a time.
PYTEST_WORKERS ?= auto
test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile

test-slow: setup
	$(BIN)/python -m pytest -m slow -n $(PYTEST_WORKERS) --dist loadfile

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache *.egg-info
