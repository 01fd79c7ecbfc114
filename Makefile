# hotswap -- the two commands a newcomer needs:
#   make demo    the local hot-upgrade demo (v1 -> v2 -> v3 under load, 0 failed)
#   make test    lint, types and the whole test suite (what CI runs)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo demo-docker images bench soak test lint typecheck pytest clean

$(VENV)/.stamp: setup.cfg pyproject.toml scripts/bootstrap.sh
	sh scripts/bootstrap.sh

demo: $(VENV)/.stamp
	$(PY) scripts/demo.py

# The container demo: builds the images (on $$BASE_IMAGE when set), then runs
# the emulated Kruise pod through two hot upgrades. Needs a Docker engine.
demo-docker: $(VENV)/.stamp
	$(PY) scripts/demo_docker.py

images: $(VENV)/.stamp
	$(PY) scripts/demo_docker.py --build-only

# Benchmarks (a few minutes, 127.0.0.1 only): hotswap against a naive restart
# and an SO_REUSEPORT overlap under the same load; writes docs/bench/. Both
# run in a network namespace of their own (scripts/own-netns.sh says why).
bench: $(VENV)/.stamp
	sh scripts/bootstrap.sh bench
	sh scripts/own-netns.sh $(PY) bench/run.py

# Hundreds of consecutive upgrades under load (a few minutes); writes docs/soak/.
soak: $(VENV)/.stamp
	sh scripts/own-netns.sh $(PY) bench/soak.py

test: $(VENV)/.stamp lint typecheck pytest

lint: $(VENV)/.stamp
	$(VENV)/bin/ruff check hotswap tests examples scripts bench

# The library, and (strict too) what users copy or run: the examples, the
# scripts and the benchmarks; and the tests. Each program directory on its
# own: two of them have a main.py, and app.py is imported from the sample's
# directory. The tests import conftest (pytest puts tests/ on the path) and
# the benchmark's run.py (test_bench_analysis puts bench/ there).
typecheck: $(VENV)/.stamp
	$(VENV)/bin/mypy
	MYPYPATH=examples/sidecar_server $(VENV)/bin/mypy examples/sidecar_server
	$(VENV)/bin/mypy examples/busybox_client scripts
	MYPYPATH=bench:examples/sidecar_server $(VENV)/bin/mypy bench
	MYPYPATH=tests:bench $(VENV)/bin/mypy tests

pytest: $(VENV)/.stamp
	sh scripts/test.sh

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
