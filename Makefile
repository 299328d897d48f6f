# lmcourse — the two commands of the README, the steps they are made of, and the GPU machine's two commands.
#   make course   set up, export, execute every chapter (smoke on CPU, full on a GPU), build the site (_docs/ or _site/)
#   make test     set up, check notebooks and package are in sync and clean, lint, run every test
#   make export   after editing a notebook: nbdev-export, then nbdev-clean (what sync-check asks for)
#   make gpu      on an H100/H200 (torch + triton preinstalled, no network): GPU tests, benchmark sweeps, results/ (<= 9 min)
#   make gpu-run CHAPTER=cog   one chapter's full run on that machine (<= 8 min)
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned, so that installing the rest never pulls another build. On the course's
# machines `torch==2.13.0` resolves to a local CPU wheel; on a plain Linux machine PyPI serves the multi-GB CUDA
# build for the same pin. For the CPU build there, take it from PyTorch's CPU index:
#   make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
# The compile test also compiles every kernel with Triton 3.6 (torch 2.11's, preinstalled on the GPU machines), from
# a side directory that only that test puts on its path; the wheel is ~190 MB.
TRITON_SIDE ?= $(VENV)/triton-3.6
TRITON_SIDE_PIN ?= triton==3.6.0
PYTHON ?= python3
CHAPTER ?=
JOBS ?= 2
NBS := $(sort $(wildcard nbs/*.ipynb))

.PHONY: course test env export sync-check lint pytest execute docs site site-test clean gpu gpu-run

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

$(TRITON_SIDE)/.installed:
	$(PY) -m pip install -q --no-deps --upgrade --target $(TRITON_SIDE) $(TRITON_SIDE_PIN)
	touch $@

export: env
	$(VENV)/bin/nbdev-export
	$(VENV)/bin/nbdev-clean

# The package must be what the notebooks export, and the notebooks what nbdev-clean leaves: checked on a copy of the
# working tree (committed or not), naming every file and cell that nbdev-export or nbdev-clean would change.
sync-check: env
	$(PY) scripts/sync_check.py

lint: env
	$(VENV)/bin/ruff check lmcourse tests scripts conftest.py

# One thread per process (each xdist worker and each notebook kernel it starts): JOBS processes on JOBS cores. With
# torch's default of a thread per core they oversubscribe the machine (DrICL's smoke notebook: 234 s wall under load
# with the default, 21 s single-threaded).
pytest: env $(TRITON_SIDE)/.installed
	OMP_NUM_THREADS=1 LMCOURSE_COMPILE_TRITONS=$(TRITON_SIDE) LMCOURSE_COMPILE_JOBS=$(JOBS) \
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

# The GPU machine: its own Python (torch 2.11, triton 3.6 preinstalled; no network, no nbdev/nbval/datasets).
# scripts/gpu.py installs this checkout (pip install --no-deps --no-build-isolation -e .) and runs its parts.
gpu:
	$(PYTHON) scripts/gpu.py

gpu-run:
	@test -n "$(CHAPTER)" || { echo "usage: make gpu-run CHAPTER=<chapter>; chapters: $$($(PYTHON) scripts/gpu.py --chapters)"; exit 2; }
	$(PYTHON) scripts/gpu.py --full $(CHAPTER)
