# The README's two commands: `make demo` (main job on the embedded demo) and `make test`.
# Both build .venv from scratch when it is missing. torch is pinned so the CPU build on disk is used.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test venv clean

$(BIN)/entropy-probe: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/entropy-probe

demo: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@echo "report: data/report/report.md, plots: data/report/*.png (dvc plots show)"

# two workers; each test module (or test class) runs on one worker (its module fixtures are built once), in the collection order
# (tests/conftest.py puts the longest first, so they start at once). Not loadgroup: with pytest 9.2 its xdist_group
# marks are silently ignored (pytest-xdist issue 1386)
XDIST := -n 2 --dist loadscope --no-loadscope-reorder

test: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest $(XDIST) -q

clean:  # everything the pipeline wrote, except data/README.md and the metrics git keeps
	rm -rf $(VENV) .dvc/cache .dvc/tmp
	find data -mindepth 1 -maxdepth 1 ! -name README.md ! -name report -exec rm -rf {} +
	[ ! -d data/report ] || find data/report -mindepth 1 -maxdepth 1 ! -name metrics -exec rm -rf {} +
