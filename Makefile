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

# pip's own progress (no -q): the first set-up downloads torch and takes a minute or two.
$(STAMP): pyproject.toml | $(BIN)/python
	@echo "== setting up $(VENV) (1/2): $(TORCH), the CPU build"
	$(BIN)/pip install --progress-bar on $(TORCH)
	@echo "== setting up $(VENV) (2/2): parscale and its extras"
	$(BIN)/pip install --progress-bar on -e ".[test]" $(TORCH)
	touch $(STAMP)
	@echo "== ready: the command is $(BIN)/parscale (or: source $(BIN)/activate, then parscale)"

demo: $(STAMP)
	$(BIN)/parscale demo --out runs/demo

# One thread per test worker: two workers fill the two cores without oversubscribing them.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadgroup

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
