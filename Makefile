# Two entry points: `make demo` trains on the built-in data, `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of PyTorch; on a CUDA machine set TORCH_SPEC=torch to take the default build.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# libtpu and the CUDA plugin, for compiling TPU and GPU programs on this host (`benchmark compile`
# and its tests), live in a venv of their own: in $(VENV) every JAX process would probe for them.
AOT_VENV ?= .venv-aot
# Test processes side by side: compilation is single-threaded, so two keep two cores busy
# (26.6 -> 19.5 min on the 2-core CPU); each takes up to ~5 GiB.
TEST_WORKERS ?= 2

.PHONY: demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The package with its runtime dependencies only: all that the demo runs on.
$(VENV)/.installed-runtime: $(BIN)/python setup.py
	$(BIN)/pip install --quiet -e .
	touch $@

# Everything: PyTorch (the reference's checkpoints and its step, in the tests) and the test tools.
# Made after the runtime stamp, so that `make demo` after `make test` has nothing to install.
$(VENV)/.installed: $(VENV)/.installed-runtime
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test,torch]"
	touch $@

$(AOT_VENV)/.installed: setup.py
	$(PYTHON) -m venv $(AOT_VENV)
	$(AOT_VENV)/bin/pip install --quiet --upgrade pip
	$(AOT_VENV)/bin/pip install --quiet -e ".[tpu,gpu-compile]"
	touch $@

demo: $(VENV)/.installed-runtime
	$(BIN)/python -m dino_jax.train --config configs/demo.py --workdir $${WORKDIR:-runs/demo}

test: $(VENV)/.installed $(AOT_VENV)/.installed
	$(BIN)/ruff check .
	DINO_JAX_AOT_PYTHON=$(AOT_VENV)/bin/python $(BIN)/python -m pytest -q -n $(TEST_WORKERS) tests

lint: $(VENV)/.installed
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(AOT_VENV) runs .pytest_cache
