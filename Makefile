# ctctl: the two commands a new user needs are `make demo` and `make test`;
# both provision the machine first (idempotent, about a second when done).
PY      := .venv/bin/python
PYTEST  := $(PY) -m pytest
# Results of the VM stage and benchmarks go here.
OUT     ?= build

.PHONY: all provision demo test test-unit test-bpf test-integration bench bench-aging bench-fastpath bench-hitpath bench-nic bench-connrate bench-punts soak experiment experiments clean help

all: help

help:
	@echo "make demo              build a box, send real traffic through it, report, clean up"
	@echo "make test              provision, then every test tier (unit, bpf, integration, VM stage)"
	@echo "make test-unit         pure Python tier (no root)"
	@echo "make test-bpf          BPF_PROG_TEST_RUN tier (root)"
	@echo "make test-integration  netns/veth tier with real programs (root)"
	@echo "make vm-test           bpf + integration tiers inside a virtme-ng guest (KERNEL=...)"
	@echo "make soak              10 minutes of short connections through a box, then its books checked (make test: 60 s)"
	@echo "make experiment        a short bundled experiment (experiments/quick.yaml, ~1 min): report with plots under $(OUT)/"
	@echo "make experiments       every bundled question (expiration, capacity, policy, termination: ~12 min)"
	@echo "make bench             benchmarks, reports under bench/results/ (aging at 100k entries)"
	@echo "make bench-aging       aging at a full 1M-entry table: full pass, sampling ticks, NIC pass (3 min, 2 GB)"
	@echo "make bench-fastpath    the soft list's fast path against the full pipeline, punts/s"
	@echo "make bench-hitpath     what recording a flow's rules costs the program's hit path, ns/packet"
	@echo "make bench-nic         the NIC program's ns/packet: bare redirect, ct hit (cached, walked), NAT hit, miss, worst cases"
	@echo "make bench-connrate    short TCP connections per second: bare, kernel, ctctl; what one costs the controller"
	@echo "make bench-punts       packets/s the controller takes through the whole pipeline, nothing offloaded"

provision:
	@bash vm/provision.sh

demo: provision
	$(PY) -m ctctl demo

# The VM stage runs the `vm` subset again inside a virtme-ng guest on
# Debian's 6.1 kernel (vm/vm.mk; SKIP_VM=1 leaves it out, loudly).
test: provision
	$(PYTEST) tests -ra
	$(MAKE) --no-print-directory vm-stage

test-unit: provision
	$(PYTEST) tests/unit -ra

test-bpf: provision
	$(PYTEST) tests/bpf -ra

test-integration: provision
	$(PYTEST) tests/integration -ra

# The soak of tests/integration/test_soak.py for 10 minutes; `make test`
# runs the same test for 60 s.
soak: provision
	CTCTL_SOAK_S=600 $(PYTEST) tests/integration/test_soak.py -s -ra

# Reports go to $(OUT)/experiments/<name>/ (report.md, summary.md, sweep.png, run-NN/).
experiment: provision
	$(PY) -m ctctl experiment run experiments/quick.yaml --out $(OUT)/experiments/quick

experiments: provision
	for s in expiration capacity policy termination; do \
		$(PY) -m ctctl experiment run experiments/$$s.yaml --out $(OUT)/experiments/$$s || exit 1; done

bench: provision
	@mkdir -p bench/results
	$(PY) bench/bench_conntrack.py
	$(PY) bench/bench_offload.py --duration 3
	$(PY) bench/bench_fastpath.py --repeat 3
	$(PY) bench/bench_aging.py --entries 100000
	$(PY) bench/bench_hitpath.py
	$(PY) bench/bench_nic.py
	$(PY) bench/bench_connrate.py --repeat 3
	$(PY) bench/bench_conncost.py
	$(PY) bench/bench_punts.py
	$(PY) bench/bench_fuzz.py
	$(PY) bench/bench_rules.py

bench-aging: provision
	$(PY) bench/bench_aging.py

bench-fastpath: provision
	$(PY) bench/bench_fastpath.py

bench-hitpath: provision
	$(PY) bench/bench_hitpath.py

bench-nic: provision
	$(PY) bench/bench_nic.py

bench-connrate: provision
	$(PY) bench/bench_connrate.py --repeat 3
	$(PY) bench/bench_conncost.py

bench-punts: provision
	$(PY) bench/bench_punts.py

include vm/vm.mk

clean:
	rm -rf $(OUT) .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
