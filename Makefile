# Entry points: `make demo`, `make test` and `make install` (.venv alone, the first step of the
# other two). Each creates .venv on first use and reinstalls only when pyproject.toml changes
# (the stamp file), so a second run does no install work.
# `make test` also builds .venv-serve (the `serve` extra: vLLM's CPU build; about 1.5 GB of its
# own, see serve-install) the same way and runs tests/serve there; the main suite in .venv neither
# collects nor skips them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Exactly this torch: it is the CPU build; any other spec pulls a multi-GB CUDA build.
TORCH  := torch==2.13.0
SERVE_VENV  := .venv-serve
SERVE_BIN   := $(SERVE_VENV)/bin
SERVE_STAMP := $(SERVE_VENV)/.installed
# Disk .venv takes once installed (measured: 1.9 GB, pip's unpacking on top), checked first by
# tools/disk_check.py (tools/serve_env.py checks .venv-serve's own the same way).
VENV_GB  := 2.5

.PHONY: install serve-install test demo clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# pip's own progress (no -q): the first set-up downloads torch and the extras (minutes: 3 min 56 s
# measured from a fresh clone with an empty pip cache on a shared 2-core machine).
$(STAMP): pyproject.toml | $(BIN)/python
	@$(PYTHON) tools/disk_check.py $(VENV_GB) $(VENV)
	@echo "== setting up $(VENV) (1/2): $(TORCH), the CPU build"
	$(BIN)/pip install --progress-bar on $(TORCH)
	@echo "== setting up $(VENV) (2/2): parscale and its extras"
	$(BIN)/pip install --progress-bar on -e ".[test]" $(TORCH)
	touch $(STAMP)
	@echo "== ready: the command is $(BIN)/parscale (or: source $(BIN)/activate, then parscale)"

# tools/serve_env.py installs the `serve` extra beside the test extras, sharing .venv's files by
# hard links and leaving out what serving on the CPU never imports (torchvision, torchaudio and
# torchcodec builds that do not load with the CPU torch; triton, a GPU compiler): about 1.5 GB
# of its own instead of 4.1 GB. It starts from a new venv each time, so nothing stale is kept.
serve-install: $(SERVE_STAMP)

$(SERVE_STAMP): pyproject.toml tools/serve_env.py $(STAMP)
	rm -rf $(SERVE_VENV)
	$(PYTHON) -m venv --without-pip $(SERVE_VENV)
	$(BIN)/python tools/serve_env.py $(VENV) $(SERVE_VENV) $(TORCH)
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
