# Two entry points: `make demo` and `make test`. Both create .venv on first use and
# reinstall only when pyproject.toml changes (the stamp file), so a second run does no install work.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Exactly this torch: it is the CPU build; any other spec pulls a multi-GB CUDA build.
TORCH  := torch==2.13.0

.PHONY: install test demo clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test]" $(TORCH)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/parscale demo --out runs/demo

# One thread per test worker: two workers fill the two cores without oversubscribing them.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadgroup

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
