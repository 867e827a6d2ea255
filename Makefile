# Everything a fresh Debian/Ubuntu machine needs is installed by these targets themselves (run as root).
PYTHON ?= /usr/bin/python3
VENV ?= .venv
BIN := $(VENV)/bin
APT_PACKAGES := iptables nftables iproute2 util-linux conntrack python3 python3-venv
PYTEST_ARGS ?=

.PHONY: test lint typecheck pytest demo bench soak deps system-deps clean manifests

test: deps lint typecheck pytest

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: pyproject.toml lab/pyproject.toml | system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]' -e ./lab
	touch $@

deps: system-deps $(VENV)/.installed

lint: deps
	$(BIN)/ruff check src lab tests bench tools
	$(BIN)/ruff format --check src lab tests bench tools

typecheck: deps
	$(BIN)/mypy
	$(BIN)/lint-imports

pytest: deps
	$(BIN)/pytest $(PYTEST_ARGS)

demo: deps
	$(BIN)/ipnc-lab demo $(DEMO_ARGS)

soak: deps
	HYPOTHESIS_PROFILE=soak $(BIN)/pytest --timeout 0 tests/test_fuzz_spec.py tests/test_security_dataplane.py tests/test_hostile_rules.py \
		tests/install/test_fuzz_install_inputs.py tests/install/test_hostile_install_inputs.py $(PYTEST_ARGS)
	IPNC_SOAK_SECONDS=$${IPNC_SOAK_SECONDS:-300} $(BIN)/pytest --timeout 0 -s tests/soak/test_chaos.py $(PYTEST_ARGS)

$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test,bench]' -e ./lab
	touch $@

bench: deps $(VENV)/.bench-installed
	$(BIN)/python bench/run.py --out docs/benchmarks.md

manifests: deps
	$(BIN)/python tools/render_manifests.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
