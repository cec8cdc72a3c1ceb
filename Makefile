# Two commands do all the set-up on a fresh machine:  `make demo`  and  `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
TRM    := $(VENV)/bin/trm
OUT    ?= out/demo

.PHONY: install system-deps demo test test-fast bench clean

install: $(VENV)/.installed

# torch is installed first and pinned: 2.13.0 is a CPU wheel on local disk; the range in
# pyproject.toml is then already satisfied, so pip never fetches a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Redis and PostgreSQL run natively for the production-store tests (no Docker engine here).
system-deps:
	@if ! command -v redis-server >/dev/null || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server postgresql >/dev/null; \
	  else echo "install redis-server and postgresql (apt) to run the Redis/Postgres tests"; fi; fi

demo: install
	$(TRM) demo --out $(OUT)

test: install system-deps
	$(VENV)/bin/pytest -q -ra

test-fast: install
	$(VENV)/bin/pytest -q -m "not integration"

bench: install
	$(PY) bench/tokenizer_bench.py

clean:
	rm -rf out artifacts runs .pytest_cache
