# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheels; GPU users: make TORCH_SPEC="torch==2.13.0" EXTRAS="gpu,dev" demo (faiss-gpu
# instead of faiss-cpu: the two extras exclude each other)
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= cpu,dev
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install browser demo test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	# Pin the torch just installed, so no dependency swaps it for another (multi-GB) build.
	$(BIN)/python -c "from importlib.metadata import version; print('torch==' + version('torch'))" > $(VENV)/constraints.txt
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/optical-ray demo

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -ra --durations=30

# Debian's chromium and chromedriver drive the search page in the serving tests; without them (no
# root, no apt) that one test skips.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; \
	else echo "chromium not installed: the search-page test will skip"; fi

lint: $(STAMP)
	$(BIN)/ruff check optical_ray jobs tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
