# One entry point for set-up, demo and checks. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build keeps CI and laptops light; on a GPU machine: make install TORCH=torch
TORCH ?= torch==2.13.0
EXTRAS ?= local,dev,ray
STAMP := $(VENV)/.installed

.PHONY: install demo test check lint typecheck bench clean sample bq-emulator infinity

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

sample/tweets.jsonl:
	$(PY) scripts/make_sample.py --lines 2000 --out sample/tweets.jsonl

demo: install
	rm -rf embeddings/demo
	$(VENV)/bin/tweet-embed embed sample/tweets.jsonl --work-dir embeddings/demo
	$(VENV)/bin/tweet-embed status --work-dir embeddings/demo
	@if $(VENV)/bin/tweet-embed consolidate --help >/dev/null 2>&1; then \
		$(VENV)/bin/tweet-embed consolidate --work-dir embeddings/demo && \
		$(VENV)/bin/tweet-embed search "watching the football match tonight" --k 5 --work-dir embeddings/demo --input sample/tweets.jsonl; \
	fi

# The BigQuery emulator for tests/test_{export,load}_bigquery.py, in its own venv (see the script); if it
# cannot be installed, those tests skip.
BQEMU_STAMP := .venv-bqemu/.installed
$(BQEMU_STAMP): scripts/setup_bq_emulator.sh
	bash scripts/setup_bq_emulator.sh .venv-bqemu && touch $(BQEMU_STAMP) || \
		echo "BigQuery emulator not installed: its tests will skip"

bq-emulator: $(BQEMU_STAMP)

# Infinity for tests/test_infinity.py, in its own venv (it pins numpy<2 and sentence-transformers<4); if it
# cannot be installed, that test skips.
INFINITY_STAMP := .venv-infinity/.installed
$(INFINITY_STAMP): scripts/setup_infinity.sh
	TORCH="$(TORCH)" bash scripts/setup_infinity.sh .venv-infinity && touch $(INFINITY_STAMP) || \
		echo "Infinity not installed: tests/test_infinity.py will skip"

infinity: $(INFINITY_STAMP)

test: install bq-emulator infinity
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

typecheck: install
	$(VENV)/bin/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) .venv-bqemu .venv-infinity embeddings .pytest_cache .mypy_cache .ruff_cache
