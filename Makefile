# lmcourse — the two commands of the README, and the steps they are made of.
#   make course   set up, export, execute every chapter (smoke on CPU, full on a GPU), build the site (_docs/ or _site/)
#   make test     set up, check notebooks and package are in sync and clean, lint, run every test
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned so that pip never pulls a different (multi-GB CUDA) build on CPU machines.
TORCH ?= torch==2.13.0
JOBS ?= 2
NBS := $(sort $(wildcard nbs/*.ipynb))

.PHONY: course test env export sync-check lint pytest execute docs site site-test clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

export: env
	$(VENV)/bin/nbdev-export

# The package must be what the notebooks export, and notebooks must be committed clean (nbdev-clean).
sync-check: env
	@if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then echo "sync-check: not a git checkout, skipped"; exit 0; fi; \
	$(VENV)/bin/nbdev-export; \
	if [ -n "$$(git status --porcelain -- lmcourse)" ]; then \
		echo "nbdev-export changed lmcourse/: the package is out of sync with the notebooks:"; git status --porcelain -- lmcourse; git diff --stat -- lmcourse; exit 1; fi; \
	$(VENV)/bin/nbdev-clean; \
	if [ -n "$$(git status --porcelain -- nbs)" ]; then \
		echo "nbdev-clean changed nbs/: notebooks carry un-cleaned metadata (run nbdev-clean and commit):"; git status --porcelain -- nbs; exit 1; fi; \
	echo "sync-check: package and notebooks in sync, notebooks clean"

lint: env
	$(VENV)/bin/ruff check lmcourse tests scripts conftest.py

pytest: env
	$(PY) -m pytest tests nbs --nbval-lax --nbval-current-env --nbval-cell-timeout=900 -n $(JOBS) --dist loadscope -q -p no:cacheprovider

test: env sync-check lint pytest

# Execute every chapter in place (outputs are what the site shows): full profile when a GPU is visible.
execute: export
	export LMCOURSE_PROFILE=$${LMCOURSE_PROFILE:-$$($(PY) -c "import torch; print('full' if torch.cuda.is_available() else 'smoke')")}; \
	echo "executing chapters with LMCOURSE_PROFILE=$$LMCOURSE_PROFILE"; \
	cd nbs && for nb in $(notdir $(NBS)); do \
		echo "== $$nb"; ../$(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=3600 "$$nb" || exit 1; \
	done
	$(VENV)/bin/nbdev-clean

# The site: Quarto through nbdev-docs when quarto is installed (the published site, _docs/); otherwise the offline
# site, built from the same processed notebooks with nbconvert (scripts/build_site.py, _site/; open _site/index.html).
docs: export
	@if command -v quarto >/dev/null 2>&1; then $(VENV)/bin/nbdev-readme && $(VENV)/bin/nbdev-docs; echo "site built in _docs/"; \
	else $(PY) scripts/build_site.py; \
		echo "Quarto is not installed, so the published (Quarto) site was not rendered: the offline site above is in _site/."; \
		echo "Open _site/index.html in a browser. For the Quarto site install it from https://quarto.org/docs/get-started/ and run 'make docs' again."; fi

# The offline site alone (also when Quarto is installed), and the same site checked in headless Chromium.
site: export
	$(PY) scripts/build_site.py

site-test: site
	LMCOURSE_SITE_TEST=1 $(PY) -m pytest tests/test_site_browser.py -q -s -p no:cacheprovider

course: env execute docs

clean:
	rm -rf _proc _docs _site .pytest_cache
