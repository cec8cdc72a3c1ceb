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

# Redis and PostgreSQL run natively for the production-store tests (no Docker engine here);
# tests/services.py starts throwaway instances of them. Root (CI) installs from apt; others get
# `sudo -n` if they have it, else a warning: the store tests then fail naming this target.
PG_INITDB = ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
system-deps:
	@if command -v redis-server >/dev/null && $(PG_INITDB) && command -v openssl >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else \
	  echo "system-deps: not root: run 'sudo make system-deps' (apt: redis-server postgresql openssl)" >&2; exit 0; fi; \
	$$SUDO apt-get update -qq && \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	  redis-server postgresql openssl >/dev/null && \
	command -v redis-server >/dev/null && $(PG_INITDB) || \
	  { echo "system-deps: redis-server/initdb still missing after apt-get install" >&2; exit 1; }

demo: install
	$(TRM) demo --out $(OUT)

test: install system-deps
	$(VENV)/bin/pytest -q -ra

test-fast: install
	$(VENV)/bin/pytest -q -m "not integration"

bench: install
	$(PY) bench/tokenizer_bench.py
	$(PY) bench/streams_bench.py
	$(PY) bench/trainer_bench.py

# 10 minutes of steady load on one `trm worker`; memory and consumer lag sampled (bench/soak.py)
.PHONY: soak
soak: install
	$(PY) bench/soak.py --out out/soak

clean:
	rm -rf out artifacts runs .pytest_cache
