# The two commands: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv and install the project from this folder.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test docs venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[test,docs]"   # test pulls the eval extra: the whole evaluation stack
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/bigain demo

test: venv
	$(PY) -m pytest -q

docs: venv
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) site build *.egg-info
