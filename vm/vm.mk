# SPDX-License-Identifier: GPL-2.0
# Targets that run ctctl's tests inside a virtme-ng guest (see docs/vm.md).
# Included by the top-level Makefile; paths are relative to the repo root.
#
#   make vm-test                      BPF + integration tiers + tests/vm, Debian's kernel
#   make vm-test KERNEL=~/linux       the same on a kernel build tree (or a bzImage)
#   make vm-test VM_TESTS='tests/vm -v'   any pytest selection
#   make vm-stage                     the runner's own host-side tests (a stopped runner
#                                     leaves no guest), then the short `-m vm` subset,
#                                     both of which `make test` runs
#
# VM_ACCEL=kvm|tcg skips the KVM probe; SKIP_VM=1 leaves the stage out of
# `make test`, loudly.  The guest's output is also kept in $(VM_OUT)/.

VM_PYTHON   ?= .venv/bin/python
VM_TESTS    ?= tests/bpf tests/integration tests/vm -v --durations=10
VM_TIMEOUT  ?= 7200
VM_STAGE_TESTS   ?= -m vm tests -v --durations=8
VM_STAGE_TIMEOUT ?= 1800
# The stage's three-way check builds ctctl's "on" box only (see
# tests/integration/test_conntrack_tcct.py): one BCC compile less under TCG.
VM_STAGE_ENV     ?= CTCTL_THREE_WAY_BOXES=on
KERNEL      ?=
VM_ACCEL    ?= auto
VM_OUT      ?= $(or $(OUT),build)
# Knobs for the tests in the guest: under TCG a BCC compile of ctctl's
# program takes minutes, not seconds, and a Python server's start can take
# more than the 30 s the host's tests allow it.
VM_ENV      ?= CTCTL_READY_TIMEOUT=600 CTCTL_START_TIMEOUT=300

vm_run = $(VM_PYTHON) vm/vmrun.py --accel $(VM_ACCEL) $(if $(KERNEL),--kernel '$(KERNEL)') \
	$(foreach e,$(VM_ENV),--env $(e))

.PHONY: vm-provision vm-test vm-stage

vm-provision:
	bash vm/provision.sh
	bash vm/provision-vm.sh

vm-test: vm-provision
	$(vm_run) --timeout $(VM_TIMEOUT) --log $(VM_OUT)/vm-test.log -- $(VM_TESTS)

vm-stage: vm-provision
ifeq ($(SKIP_VM),1)
	@echo "*** VM stage SKIPPED (SKIP_VM=1): nothing was checked on a second kernel ***"
else
	$(VM_PYTHON) -m pytest tests/vm/test_vmrun.py -ra
	$(vm_run) $(foreach e,$(VM_STAGE_ENV),--env $(e)) --timeout $(VM_STAGE_TIMEOUT) --log $(VM_OUT)/vm-stage.log -- $(VM_STAGE_TESTS)
endif
