# Everything a fresh Debian/Ubuntu machine needs is installed by these targets themselves (run as root).
PYTHON ?= /usr/bin/python3
VENV ?= .venv
BIN := $(VENV)/bin
APT_PACKAGES := iptables nftables iproute2 util-linux conntrack python3 python3-venv
PYTEST_ARGS ?=

.PHONY: realnode test lint typecheck pytest demo bench soak deps system-deps clean manifests image image-archive image-base tool-deps

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

pytest: deps image-archive
	$(BIN)/pytest $(PYTEST_ARGS)

# The real-node tier (docs/realnode.md): a real kubelet, containerd and kube-apiserver on this machine. Needs
# IPNC_REALNODE_BIN=DIR or IPNC_REALNODE_ARCHIVE=FILE.tar.xz (kube-apiserver, kube-controller-manager, kubelet,
# etcd, a pause image archive); never part of `make test`.
realnode: deps tool-deps image-archive
	$(BIN)/pytest -m realnode --timeout 900 tests/realnode $(PYTEST_ARGS)

demo: deps
	$(BIN)/ipnc-lab demo $(DEMO_ARGS)

soak: deps
	HYPOTHESIS_PROFILE=soak $(BIN)/pytest --timeout 0 tests/test_fuzz_spec.py tests/test_security_dataplane.py tests/test_hostile_rules.py \
		tests/install/test_fuzz_install_inputs.py tests/install/test_hostile_install_inputs.py $(PYTEST_ARGS)
	IPNC_SOAK_SECONDS=$${IPNC_SOAK_SECONDS:-300} $(BIN)/pytest --timeout 0 -s tests/soak/test_chaos.py $(PYTEST_ARGS)

$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test,bench]' -e ./lab
	touch $@

bench: deps $(VENV)/.bench-installed image
	$(BIN)/python bench/run.py --out docs/benchmarks.md

manifests: deps
	$(BIN)/python tools/render_manifests.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# -- The image: built from the Dockerfile by podman (runc, lower rlimits: tools/containers.conf). No registry
# is reachable from CI, so the base is made here: a debootstrap of Debian bookworm with python3 and the rule
# tools, cached in build/image/ (delete the tar to refresh it), from the Debian mirror the host's apt already
# uses (tools/debian_mirror.py; or DEBIAN_MIRROR=URL). `make image BASE_IMAGE=python:3.11-slim-bookworm`
# uses a public base instead. The build fetches nothing from PyPI: the host's pip downloads the dependencies'
# wheels, mounted into the build. docs/install.md has the user's side.
TOOL_APT_PACKAGES := podman buildah debootstrap runc containerd containernetworking-plugins prometheus gdb
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= ghcr.io/istio-pod-network-controller/istio-pod-network-controller:$(VERSION)
LOCAL_BASE := localhost/ipnc-base:bookworm
BASE_IMAGE ?= $(LOCAL_BASE)
BASE_PACKAGES := python3,iptables,nftables,iproute2
DEBIAN_MIRROR ?=
IMAGE_BUILD := build/image
BASE_TAR := $(IMAGE_BUILD)/base-bookworm.tar
BASE_MARK := $(IMAGE_BUILD)/.base-imported
WHEELS := $(IMAGE_BUILD)/wheels
ARCHIVE := $(IMAGE_BUILD)/istio-pod-network-controller-$(VERSION).tar
PODMAN := CONTAINERS_CONF=$(CURDIR)/tools/containers.conf podman

# podman, buildah, debootstrap, runc (build and run the image); containerd (tests/image imports the archive;
# with the CNI plugins it runs the real-node tier's pods);
# prometheus (promtool and a server for the monitoring tests).
# No recommends: they would add crun, dbus and the node exporter's service.
tool-deps:
	@missing=""; for p in $(TOOL_APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(BASE_TAR): | tool-deps
	rm -rf $(IMAGE_BUILD)/rootfs && mkdir -p $(IMAGE_BUILD)
	mirror="$(DEBIAN_MIRROR)"; [ -n "$$mirror" ] || mirror=$$($(PYTHON) tools/debian_mirror.py) || exit 1; \
	debootstrap --variant=minbase --include=$(BASE_PACKAGES) bookworm $(IMAGE_BUILD)/rootfs "$$mirror"
	cd $(IMAGE_BUILD)/rootfs && rm -rf var/cache/apt/archives/*.deb var/cache/apt/*.bin var/lib/apt/lists/* \
		var/log/* usr/share/doc/* usr/share/man/* usr/share/info/* usr/share/locale/*
	tar -C $(IMAGE_BUILD)/rootfs --numeric-owner -cf $@.part . && mv $@.part $@
	rm -rf $(IMAGE_BUILD)/rootfs

ifeq ($(BASE_IMAGE),$(LOCAL_BASE))
# Import when the image is missing, the marker is missing (dash's -nt is false then) or the tar is newer.
image-base: $(BASE_TAR) | tool-deps
	@if ! $(PODMAN) image exists $(BASE_IMAGE) || [ ! -e $(BASE_MARK) ] || [ $(BASE_TAR) -nt $(BASE_MARK) ]; \
	then $(PODMAN) import -q $(BASE_TAR) $(BASE_IMAGE) && touch $(BASE_MARK); fi
else
image-base: | tool-deps
endif

$(WHEELS)/.done: pyproject.toml $(VENV)/.installed
	rm -rf $(WHEELS) && mkdir -p $(WHEELS)
	$(BIN)/python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
		> $(IMAGE_BUILD)/requirements.txt
	$(BIN)/pip wheel -q -w $(WHEELS) -r $(IMAGE_BUILD)/requirements.txt "setuptools>=68"
	touch $@

image: image-base $(WHEELS)/.done
	$(PODMAN) build -q --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg VERSION=$(VERSION) \
		--build-arg "PIP_OPTIONS=--no-index --find-links /wheels" -v $(CURDIR)/$(WHEELS):/wheels:ro -t $(IMAGE) .

# A docker-archive a node's containerd imports: ctr -n k8s.io images import FILE (docs/install.md). A file
# target: built (image and archive) only when what goes into the image changed, or the image is gone.
IMAGE_SOURCES := Dockerfile .dockerignore pyproject.toml README.md \
	$(shell find src -type f -not -name '*.pyc' -not -path '*.egg-info/*' 2>/dev/null)
image-archive:
	@$(PODMAN) image exists $(IMAGE) || rm -f $(ARCHIVE)
	@$(MAKE) --no-print-directory $(ARCHIVE)

$(ARCHIVE): $(IMAGE_SOURCES) $(WHEELS)/.done
	$(MAKE) --no-print-directory image
	rm -f $@.part
	$(PODMAN) save -q --format docker-archive -o $@.part $(IMAGE) && mv $@.part $@
	@echo "wrote $@ ($(IMAGE))"
