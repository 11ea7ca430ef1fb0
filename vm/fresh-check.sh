#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
# Prove the README's promise on a fresh machine: in a freshly bootstrapped
# Debian 12 root that has only what a new machine of this kind has (python3,
# make, git, gcc, CA certificates), a clean clone of the committed HEAD runs
# `make test` and then `make demo` with no other step.  Run as root on a
# Debian/Ubuntu host; see docs/fresh-check.md.
#
#   vm/fresh-check.sh                 build (or reuse) the base, run test + demo
#   vm/fresh-check.sh --rebuild       bootstrap the base again first
#   vm/fresh-check.sh --in-place CMD  run CMD (bash -c) in the root left by the
#                                     last check, mounted the same way; for
#                                     trying a fix by hand
#
# Environment: CTCTL_FRESH_DIR (work dir, default /var/tmp/ctctl-fresh),
# CTCTL_FRESH_REPO (repo to clone, default the one holding this script),
# CTCTL_FRESH_TARGETS (make targets, default "test demo"), CTCTL_FRESH_VERBOSE=1
# (also print the logs as they are written).
#
# Everything runs in a private mount namespace, so even a killed run leaves no
# mount behind; the EXIT trap also kills every process whose root is the fresh
# root, deletes the network namespaces made inside it and unmounts it.
set -euo pipefail

work=${CTCTL_FRESH_DIR:-/var/tmp/ctctl-fresh}
repo=${CTCTL_FRESH_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
targets=${CTCTL_FRESH_TARGETS:-test demo}
suite=bookworm
# What a new Debian machine of the kind CI runs on has before the
# project's scripts run: CPython, make, git, gcc, and the CA certificates
# the registries are reached through.  Deliberately not
# python3-venv/pip, BCC, headers, iproute2 or any traffic tool: provision
# must install those.
# debootstrap installs no Recommends, so gcc comes without libc6-dev: a C
# compiler but no C library headers.
base_pkgs=${CTCTL_FRESH_BASE_PKGS:-python3,make,git,gcc,ca-certificates}

base_tar=$work/base.tar
base_stamp=$work/base.stamp
root=$work/root

say() { printf 'fresh-check: %s\n' "$*" >&2; }
die() { say "$*"; exit 2; }

rebuild=
in_place=
while [ $# -gt 0 ]; do
	case $1 in
	--rebuild) rebuild=1; shift ;;
	--in-place) [ $# -ge 2 ] || die "--in-place needs a command"; in_place=$2; shift 2 ;;
	-h|--help) sed -n '3,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	*) die "unknown argument $1 (see --help)" ;;
	esac
done

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, chroot, mounts)"

# All mounts made from here on live in a private mount namespace: none of them
# is seen by the host, and they all go away when the last process in it does.
if [ -z "${CTCTL_FRESH_NS:-}" ]; then
	export CTCTL_FRESH_NS=1
	args=()
	[ -n "$rebuild" ] && args+=(--rebuild)
	[ -n "$in_place" ] && args+=(--in-place "$in_place")
	exec unshare --mount --propagation private -- "$BASH" "${BASH_SOURCE[0]}" "${args[@]}"
fi

now() { date +%s; }
fmt() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }
declare -A dur=()

# ---------------------------------------------------------------- host side
host_apt_sources() {
	# The Debian entries of the host's apt sources, deb822 or one-line.
	local f
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
		[ -f "$f" ] || continue
		grep -qE 'debian\.org|debian-archive-keyring' "$f" && printf '%s\n' "$f"
	done
	return 0
}

host_mirror() {
	# The host's mirror for the main suite: the URI of the first Debian entry
	# that is not the security archive.
	local f uri
	for f in $(host_apt_sources); do
		case $f in
		*.sources) uri=$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) print $i}' "$f" | grep -v security | head -n 1) ;;
		*) uri=$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) {print $i; break}}' "$f" | grep -v security | head -n 1) ;;
		esac
		[ -n "$uri" ] && { printf '%s\n' "$uri"; return; }
	done
	printf '%s\n' http://deb.debian.org/debian
}

ensure_host_tools() {
	local missing=()
	command -v debootstrap >/dev/null || missing+=(debootstrap)
	command -v git >/dev/null || missing+=(git)
	[ ${#missing[@]} -eq 0 ] && return
	say "installing ${missing[*]} on the host"
	DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q "${missing[@]}" >&2 ||
		{ apt-get -o DPkg::Lock::Timeout=600 update -q >&2 &&
		  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q "${missing[@]}" >&2; }
}

# ----------------------------------------------------------- the fresh root
mounts_under() {
	# Mount points at or below $1, deepest (latest) first.
	awk -v r="$1" '$5 == r || index($5, r "/") == 1 {print $5}' /proc/self/mountinfo | tac
}

root_id=
same_root() { [ "$(stat -L -c %d:%i "/proc/$1/root" 2>/dev/null)" = "$root_id" ]; }

kill_root_procs() {
	# Every process whose root directory is the fresh root was started by
	# this check (nothing else chroots there); end them, then wait for them.
	[ -n "$root_id" ] || return 0
	local sig p pids
	for sig in TERM KILL; do
		pids=()
		for p in /proc/[0-9]*; do
			p=${p#/proc/}
			[ "$p" != $$ ] && same_root "$p" && pids+=("$p")
		done
		[ ${#pids[@]} -eq 0 ] && return 0
		say "ending ${#pids[@]} process(es) left in the root (SIG$sig): ${pids[*]}"
		kill -"$sig" "${pids[@]}" 2>/dev/null || true
		for p in "${pids[@]}"; do timeout 10 tail --pid="$p" -f /dev/null 2>/dev/null || true; done
	done
}

leftovers=()
cleanup() {
	local rc=$? m n
	trap - EXIT INT TERM
	set +e
	kill_root_procs
	wait    # the logging pipeline ends once nothing in the root writes to it
	if [ -d "$root/run/netns" ]; then
		for n in "$root"/run/netns/*; do
			[ -e "$n" ] || continue
			leftovers+=("network namespace ${n##*/}")
			umount "$n" 2>/dev/null || umount -l "$n"
			rm -f "$n"
		done
	fi
	# (maps.debug and progs.debug are the kernel's own, in every bpffs.)
	if mountpoint -q "$root/sys/fs/bpf"; then
		m=$(cd "$root/sys/fs/bpf" && find . -mindepth 1 ! -name maps.debug ! -name progs.debug | head -n 20 | tr '\n' ' ')
		[ -z "$m" ] || leftovers+=("bpffs pins: $m")
	fi
	for m in $(mounts_under "$root"); do
		umount "$m" 2>/dev/null || umount -l "$m" || say "cannot unmount $m"
	done
	if [ -n "$(mounts_under "$root")" ]; then
		say "still mounted: $(mounts_under "$root" | tr '\n' ' ')"
		rc=3
	fi
	for m in "${leftovers[@]}"; do say "LEFT BEHIND by the run: $m"; done
	exit "$rc"
}

build_base() {
	local mirror stamp_want tmp f
	mirror=$(host_mirror)
	stamp_want="$suite minbase $base_pkgs $mirror"
	if [ -z "$rebuild" ] && [ -f "$base_tar" ] && [ "$(cat "$base_stamp" 2>/dev/null)" = "$stamp_want" ]; then
		say "reusing the pristine base $base_tar ($(cat "$base_stamp"))"
		return
	fi
	tmp=$work/base-build
	[ -z "$(mounts_under "$tmp")" ] || die "$tmp has mounts; refusing to remove it"
	rm -rf "$tmp" "$base_tar" "$base_stamp"
	mkdir -p "$tmp"
	say "debootstrap $suite (minbase + $base_pkgs) from $mirror into $tmp"
	debootstrap --variant=minbase --include="$base_pkgs" \
		--keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
		"$suite" "$tmp" "$mirror" >"$work/debootstrap.log" 2>&1 ||
		{ tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed; see $work/debootstrap.log"; }
	# The registries as a new machine of this kind reaches them: the host's
	# Debian apt sources and fetch settings, and its extra CA certificates
	# (the ones its TLS to PyPI is checked against).
	rm -f "$tmp/etc/apt/sources.list"
	for f in $(host_apt_sources); do cp "$f" "$tmp$f"; done
	for f in /etc/apt/apt.conf.d/*; do
		[ -f "$f" ] && grep -q '^Acquire::' "$f" && cp "$f" "$tmp/etc/apt/apt.conf.d/"
	done
	if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
		cp /usr/local/share/ca-certificates/*.crt "$tmp/usr/local/share/ca-certificates/"
		chroot "$tmp" /usr/sbin/update-ca-certificates >>"$work/debootstrap.log" 2>&1
	fi
	cp /etc/resolv.conf "$tmp/etc/resolv.conf"
	chroot "$tmp" apt-get clean
	tar -C "$tmp" --numeric-owner --xattrs -cf "$base_tar.new" .
	mv "$base_tar.new" "$base_tar"
	printf '%s\n' "$stamp_want" >"$base_stamp"
	rm -rf "$tmp"
	say "pristine base saved as $base_tar ($(du -h "$base_tar" | cut -f1))"
}

restore_root() {
	[ -z "$(mounts_under "$root")" ] || die "$root still has mounts: $(mounts_under "$root" | tr '\n' ' ')"
	# Processes still in the old root can only be left from a check that was
	# killed with SIGKILL (we hold the lock): end them before removing it.
	if [ -d "$root" ]; then root_id=$(stat -c %d:%i "$root"); kill_root_procs; root_id=; fi
	rm -rf "$root"
	mkdir -p "$root"
	tar -C "$root" --numeric-owner --xattrs -xf "$base_tar"
}

mount_root() {
	cp /etc/resolv.conf "$root/etc/resolv.conf"
	# The root is a mount point of its own, so `ip netns exec` can make
	# "/" a slave mount inside it.
	mount --bind "$root" "$root"
	mount --make-private "$root"
	mount -t proc proc "$root/proc"
	mount --rbind /sys "$root/sys"
	mount --make-rslave "$root/sys"
	# A bpffs of its own (provision mounts it, as on a machine without one):
	# the host's bpffs would share pins (/sys/fs/bpf/ctctl/<box>) with any
	# run on the host.
	if mountpoint -q "$root/sys/fs/bpf"; then umount -l "$root/sys/fs/bpf"; fi
	mount --rbind /dev "$root/dev"
	mount --make-rslave "$root/dev"
	mountpoint -q "$root/dev/pts" || mount -t devpts devpts "$root/dev/pts"
	# A fresh /run: `ip netns add` makes /run/netns a shared mount point of
	# its own and binds namespaces onto files in it.
	mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$root/run"
	mkdir -p "$root/run/lock"
	root_id=$(stat -c %d:%i "$root")
}

in_root() {
	chroot "$root" /usr/bin/env -i 9>&- \
		PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		HOME=/root TERM=dumb LANG=C.UTF-8 \
		/bin/bash -c "$1"
}

stamp_lines() {
	local line
	while IFS= read -r line; do printf '%(%H:%M:%S)T %s\n' -1 "$line"; done
}

run_logged() {
	# run_logged NAME CMD: CMD in the root, output time-stamped into NAME.log.
	# The pipeline runs in the background so that a TERM sent to this script
	# is acted on at once (bash defers traps until a foreground job ends).
	local name=$1 cmd=$2 t0 rc log=$logdir/$1.log rcfile=$logdir/$1.rc
	say "running \`$cmd\` in the fresh root (log: $log)"
	t0=$(now)
	rm -f "$rcfile"
	( set +e; in_root "$cmd" </dev/null 2>&1; echo $? >"$rcfile" ) | stamp_lines |
		if [ -n "${CTCTL_FRESH_VERBOSE:-}" ]; then tee "$log"; else cat >"$log"; fi &
	wait $! || true
	rc=$(cat "$rcfile" 2>/dev/null || echo 255)
	dur[$name]=$(($(now) - t0))
	codes[$name]=$rc
	say "$name: exit $rc after $(fmt "${dur[$name]}")"
}

# -------------------------------------------------------------------- main
ensure_host_tools
mkdir -p "$work"
# One check at a time per work dir: another one's mounts live in its own
# mount namespace, invisible here, so restoring the root under it would
# pull its files away.
exec 9>"$work/.lock"
flock -n 9 || die "another fresh-check is running on $work"
declare -A codes=()
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ -n "$in_place" ]; then
	[ -d "$root/work/ctctl" ] || die "no root at $root: run a check first"
	mount_root
	logdir=$work/logs/in-place-$(date +%Y%m%d-%H%M%S)
	mkdir -p "$logdir"
	run_logged in-place "$in_place"
	tail -n 40 "$logdir/in-place.log" >&2
	exit "${codes[in-place]}"
fi

t=$(now); build_base; dur[base]=$(($(now) - t))
t=$(now); restore_root; dur[restore]=$(($(now) - t))

t=$(now)
mkdir -p "$root/work"
git clone -q --no-hardlinks "$repo" "$root/work/ctctl"
head=$(git -C "$root/work/ctctl" rev-parse HEAD)
subject=$(git -C "$root/work/ctctl" log -1 --format=%s)
dur[clone]=$(($(now) - t))
say "cloned $repo at $head ($subject)"

logdir=$work/logs/$(date +%Y%m%d-%H%M%S)-${head:0:10}
mkdir -p "$logdir"
mount_root

for tgt in $targets; do
	run_logged "$tgt" "cd /work/ctctl && make $tgt"
done
# Diagnostics after the targets (provision has installed iproute2 by then):
# the kernel header wiring and that `ip netns` works inside this root.
run_logged netns-probe 'uname -r; ls -l /lib/modules/$(uname -r)/; mountpoint /sys/fs/bpf;
	command -v ip >/dev/null || { echo "no ip(8): iproute2 is missing"; exit 1; }
	ip netns add fresh-probe && ip netns exec fresh-probe ip -brief link show lo &&
	ip netns delete fresh-probe && ip netns list | wc -l'

kill_root_procs
{
	printf 'commit   %s %s\n' "$head" "$subject"
	printf 'kernel   %s\n' "$(uname -r)"
	printf 'base     %s (%s)\n' "$(fmt "${dur[base]}")" "$(cat "$base_stamp")"
	printf 'restore  %s\n' "$(fmt "${dur[restore]}")"
	printf 'clone    %s\n' "$(fmt "${dur[clone]}")"
	for tgt in $targets netns-probe; do
		printf '%-12s exit %s after %s\n' "$tgt" "${codes[$tgt]}" "$(fmt "${dur[$tgt]}")"
	done
} | tee "$logdir/summary.txt" >&2
for tgt in $targets netns-probe; do
	# What provision did, then pytest's short summary or the last lines.
	printf '\n---- %s\n' "$logdir/$tgt.log" >&2
	has=0; grep -q ' short test summary info ' "$logdir/$tgt.log" && has=1
	awk -v n="$(wc -l <"$logdir/$tgt.log")" -v has="$has" '
		/ short test summary info / { summary = 1 }
		summary || (!has && NR > n - 25) { print; next }
		/^[0-9:]+ provision: / { print }' "$logdir/$tgt.log" | tail -n 60 >&2
done
say "logs in $logdir"

rc=0
for tgt in $targets; do [ "${codes[$tgt]}" -eq 0 ] || rc=1; done
exit "$rc"
