#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
# Runs inside the virtme-ng guest that vm/vmrun.py boots: prepares what the
# tests need from the guest kernel (bpffs, a header tree for BCC), then runs
# pytest with the arguments given.  The two "ctctl-vm:" lines are read by the
# host to tell a test failure from a guest that never got as far as the tests.
#
# Environment (set by vmrun.py):
#   CTCTL_KERNEL_TREE  kernel build tree the guest kernel came from, if any
#   CTCTL_EXPECT_KERNEL  release the host booted; tests/vm checks it
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
kver=$(uname -r)
say() { printf 'ctctl-vm: %s\n' "$*"; }

say "guest kernel: $kver"

mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf || say "cannot mount bpffs"

# BCC compiles against /lib/modules/<release>/build.  /lib is a throw-away
# overlay in the guest, so wiring a tree in here never touches the host.
# Order of preference: the kernel's own packaged headers, the build tree the
# kernel came from, and only then the newest generic Debian headers (which is
# a fallback, so it is said out loud).
build=/lib/modules/$kver/build
if [ -e "$build/include" ]; then
	say "kernel headers: $(readlink -f "$build")"
elif [ -n "${CTCTL_KERNEL_TREE:-}" ] && [ -e "$CTCTL_KERNEL_TREE/include/generated" ]; then
	mkdir -p "/lib/modules/$kver"
	ln -sfn "$CTCTL_KERNEL_TREE" "$build"
	ln -sfn "$CTCTL_KERNEL_TREE" "/lib/modules/$kver/source"
	say "kernel headers: build tree $CTCTL_KERNEL_TREE"
else
	arch_dir=$(shopt -s nullglob; printf '%s\n' /usr/src/linux-headers-*-amd64 | sort -V | tail -n 1)
	if [ -n "$arch_dir" ]; then
		common_dir=${arch_dir%-amd64}-common
		[ -d "$common_dir" ] || common_dir=$arch_dir
		mkdir -p "/lib/modules/$kver"
		ln -sfn "$arch_dir" "$build"
		ln -sfn "$common_dir" "/lib/modules/$kver/source"
		say "kernel headers: FALLBACK to $arch_dir (no headers for $kver)"
	else
		say "kernel headers: none for $kver; BCC tests will fail to compile"
	fi
fi

cd "$here" || exit 1
# The repo is an overlay in the guest: writes (bytecode caches, pytest's
# cache) stay in the guest, so the host checkout is never modified.
"$here/.venv/bin/python" -m pytest -p no:cacheprovider "$@"
rc=$?
say "pytest exit status: $rc"
exit "$rc"
