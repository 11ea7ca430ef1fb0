#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
# Install what `make vm-test` needs to boot a kernel in a virtme-ng guest, as
# root, after vm/provision.sh: QEMU, Debian's packaged kernel (the guest's
# default, the same version as the linux-headers-amd64 that provision.sh
# installed, so BCC in the guest compiles against exactly matching headers),
# busybox for virtme-ng's initramfs, and virtme-ng itself.
# Idempotent: when everything is in place it changes nothing and takes well
# under a second.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# virtme-ng is a tool, not a dependency of ctctl: it gets its own venv so that
# its requirements never leak into the environment the tests import from.
vng_venv=${VNG_VENV:-$here/.venv-vm}
vng_version=${VNG_VERSION:-1.42}

log() { printf 'provision-vm: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
	log "must run as root (apt, and the guest's BPF tests need it)"
	exit 1
fi

# qemu-system-x86: the emulator (KVM where it works, TCG elsewhere).
# linux-image-amd64: the guest's default kernel; its modules (9p, virtio,
#   veth, sch_ingress, cls_bpf) are what virtme-ng loads from its initramfs.
# linux-headers-amd64: pulled at the same version as the image, so that
#   /lib/modules/<guest kernel>/build exists inside the guest.
# busybox-static: virtme-ng builds an initramfs around it whenever the kernel
#   needs modules to mount its root, which Debian's kernel does.
# file, kmod: virtme-ng runs `file` to check busybox is static and reads
#   the kernel's modules with kmod's tools (a minimal Debian has neither).
pkgs=(qemu-system-x86 linux-image-amd64 linux-headers-amd64 busybox-static
      python3-venv file kmod)

have_pkg() { dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null | grep -qx installed; }

missing=()
for p in "${pkgs[@]}"; do have_pkg "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
	log "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get -o DPkg::Lock::Timeout=600 update -q || log "apt-get update reported errors; trying the install anyway"
	# Install the image and the headers in one transaction so that apt
	# resolves both meta-packages to the same kernel ABI.
	apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}"
fi

# The image and the headers must be the same kernel; a half-upgraded pair
# would silently make BCC in the guest use mismatched headers.
img_dep=$(dpkg-query -W -f='${Depends}' linux-image-amd64 | grep -o 'linux-image-[0-9][^ ,]*' | head -n 1)
hdr_dep=$(dpkg-query -W -f='${Depends}' linux-headers-amd64 | grep -o 'linux-headers-[0-9][^ ,]*' | head -n 1)
if [ "${img_dep#linux-image-}" != "${hdr_dep#linux-headers-}" ]; then
	log "linux-image-amd64 ($img_dep) and linux-headers-amd64 ($hdr_dep) disagree; upgrading both"
	export DEBIAN_FRONTEND=noninteractive
	apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends linux-image-amd64 linux-headers-amd64
fi

if [ ! -x "$vng_venv/bin/vng" ] || [ "$("$vng_venv/bin/vng" --version 2>/dev/null | awk '{print $NF}')" != "$vng_version" ]; then
	log "installing virtme-ng $vng_version into $vng_venv"
	[ -x "$vng_venv/bin/python" ] || /usr/bin/python3 -m venv "$vng_venv"
	"$vng_venv/bin/pip" install -q --disable-pip-version-check "virtme-ng==$vng_version"
fi

# /boot/vmlinuz-* is root-only readable on Debian; the runner runs as root,
# but say where the default kernel is so that a failure is easy to place.
kimg=$(shopt -s nullglob; printf '%s\n' /boot/vmlinuz-*-amd64 | sort -V | tail -n 1)
[ -n "$kimg" ] || { log "no /boot/vmlinuz-*-amd64 after installing linux-image-amd64"; exit 1; }
