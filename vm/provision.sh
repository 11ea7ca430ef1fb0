#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
# Set up everything ctctl needs on a Debian/Ubuntu machine, as root.
# Used by `make demo`, `make test`, CI and the Vagrant VM.  Idempotent: when
# everything is already in place it changes nothing and takes about a second.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-$here/.venv}
kver=$(uname -r)

log() { printf 'provision: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
	# Without root nothing can be installed, but a machine provisioned
	# earlier still runs the unit tier (the root tiers skip with a reason).
	if "$venv/bin/python" -c 'import pyroute2, yaml, pytest, scapy' 2>/dev/null; then
		exit 0
	fi
	log "must run as root once (apt, kernel headers, bpffs, $venv)"
	exit 1
fi

# Debian's BCC, never PyPI's `bcc` (an unrelated package), plus the tools the
# demo and the tests drive as real programs.
pkgs=(python3-bpfcc libbpfcc python3-venv python3-pip iproute2 iputils-ping
      netcat-openbsd iperf3 tcpdump conntrack iptables ethtool procps make
      gcc libc6-dev)  # gcc + libc headers: tests/unit/test_abi.py compiles the ABI header

have_pkg() { dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null | grep -qx installed; }

apt_updated=
apt_install() {
	export DEBIAN_FRONTEND=noninteractive
	if [ -z "$apt_updated" ]; then
		# A third-party source that cannot be reached must not stop us:
		# what we need comes from the distribution's own archive.
		apt-get -o DPkg::Lock::Timeout=600 update -q || log "apt-get update reported errors; trying the install anyway"
		apt_updated=1
	fi
	apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "$@"
}

missing=()
for p in "${pkgs[@]}"; do have_pkg "$p" || missing+=("$p"); done
[ ${#missing[@]} -eq 0 ] || { log "installing ${missing[*]}"; apt_install "${missing[@]}"; }

# BCC compiles against a kernel header tree at /lib/modules/$(uname -r)/build.
# Use the running kernel's own headers where the distribution has them;
# otherwise wire the distribution's generic headers in (enough for the
# SCHED_CLS programs ctctl compiles; see README, "Kernel headers").
build=/lib/modules/$kver/build
if [ ! -e "$build/include" ]; then
	if have_pkg "linux-headers-$kver" || apt-cache show "linux-headers-$kver" >/dev/null 2>&1; then
		have_pkg "linux-headers-$kver" || apt_install "linux-headers-$kver"
	fi
	if [ ! -e "$build/include" ]; then
		generic=linux-headers-amd64
		[ -r /etc/lsb-release ] && grep -q Ubuntu /etc/lsb-release && generic=linux-headers-generic
		have_pkg "$generic" || apt_install "$generic"
		arch_dir=$(shopt -s nullglob; printf '%s\n' /usr/src/linux-headers-*-amd64 /usr/src/linux-headers-*-generic | sort -V | tail -n 1)
		[ -n "$arch_dir" ] || { log "no generic kernel headers found under /usr/src"; exit 1; }
		common_dir=${arch_dir%-amd64}-common
		[ -d "$common_dir" ] || common_dir=$arch_dir
		mkdir -p "/lib/modules/$kver"
		ln -sfn "$arch_dir" "/lib/modules/$kver/build"
		ln -sfn "$common_dir" "/lib/modules/$kver/source"
		log "kernel $kver has no header package; using $arch_dir"
	fi
fi

# Pinned maps live in bpffs.
if ! mountpoint -q /sys/fs/bpf; then
	mount -t bpf bpf /sys/fs/bpf
fi

# The venv sees Debian's BCC through --system-site-packages.
if [ ! -x "$venv/bin/python" ]; then
	log "creating $venv"
	/usr/bin/python3 -m venv --system-site-packages "$venv"
fi
stamp=$venv/.ctctl-installed
want=$(cat "$here/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
	log "installing ctctl and its test extra into $venv"
	"$venv/bin/pip" install -q --disable-pip-version-check -e "$here[test]"
	echo "$want" >"$stamp"
fi
"$venv/bin/python" -c 'import bcc, pyroute2, scapy, yaml, pytest, numpy, prometheus_client, matplotlib' || {
	log "the venv cannot import bcc/pyroute2/scapy/yaml/pytest/numpy/prometheus_client/matplotlib"; exit 1; }
