#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Run ctctl's tests inside a virtme-ng guest, on a kernel of your choice.

The guest boots the chosen kernel over a copy-on-write snapshot of this
machine's root filesystem, so it sees the same checkout, venv and tools; the
checkout is an overlay in the guest, so nothing the tests write reaches the
host.  The host prints the guest's kernel release, streams pytest's per-test
lines, and exits with pytest's status.

KVM is used where a KVM guest actually boots; where /dev/kvm is missing or a
short probe boot shows no kernel output (nested KVM on some hosts hangs
silently), the guest runs under TCG, software emulation, about ten times
slower.  The probe's answer is cached for the current host boot.

The guest runs in a session of its own (so that the terminal's Ctrl-C
reaches the runner, not qemu, mid-write); the runner ends that whole
process group when it is stopped itself (SIGINT, SIGTERM, SIGHUP: exit
status 128 + the signal), on its timeout, and after a probe: nothing it
started outlives it.  Every minute it says how far the guest got.

Standard library only: it runs under any python3 >= 3.9.
"""

import argparse
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VNG_VENV = os.environ.get("VNG_VENV", os.path.join(REPO, ".venv-vm"))
ACCEL_CACHE = "/run/ctctl-vm/accel"
PROBE_MARK = b"Linux version"
GUEST_KERNEL_RE = re.compile(r"^ctctl-vm: guest kernel: (\S+)")
GUEST_EXIT_RE = re.compile(r"^ctctl-vm: pytest exit status: (\d+)")
# pytest's progress in the guest: the collection line ("collecting ...
# collected 2008 items / 1990 deselected / 18 selected" under -v), and -v's
# per-test lines ("tests/x.py::test_y PASSED    [ 12%]").
COLLECTED_RE = re.compile(r"\bcollected (\d+) items?(?: / (\d+) deselected)?")
RESULT_RE = re.compile(r"::\S.* (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
PROGRESS_EVERY = 60.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# Exit statuses of our own, outside pytest's 0-5.
EXIT_USAGE = 64
EXIT_NO_GUEST = 65  # the guest never reported the end of the tests
EXIT_WRONG_KERNEL = 66  # the guest ran a different kernel than asked for
EXIT_TIMEOUT = 124


def log(msg):
    print(f"vmrun: {msg}", file=sys.stderr, flush=True)


class UsageError(Exception):
    pass


class Stopped(Exception):
    """The runner was asked to stop (a signal): end what it started."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum, frame):
    raise Stopped(signum)


def bzimage_release(path):
    """The release string an x86 bzImage declares in its setup header.

    The boot protocol puts "HdrS" at 0x202 and, at 0x20E, the offset (less
    0x200) of a NUL-terminated "release (builder) #version" string.  Returns
    None when the file is not a bzImage or declares no version.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(0x10000)
    except OSError as exc:
        raise UsageError(f"cannot read kernel image {path}: {exc.strerror}") from None
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        return None
    (off,) = struct.unpack_from("<H", head, 0x20E)
    if off == 0 or off + 0x200 >= len(head):
        return None
    text = head[off + 0x200 :].split(b"\0", 1)[0].decode("ascii", "replace")
    return text.split()[0] if text.strip() else None


def _version_key(path):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]


def default_kernel():
    """Debian's packaged kernel (linux-image-amd64), newest first."""
    images = [
        os.path.join("/boot", n)
        for n in os.listdir("/boot")
        if n.startswith("vmlinuz-") and n.endswith("-amd64")
    ]
    if not images:
        raise UsageError(
            "no /boot/vmlinuz-*-amd64: run `bash vm/provision-vm.sh` "
            "(it installs linux-image-amd64), or pass KERNEL=/path/to/bzImage"
        )
    return sorted(images, key=_version_key)[-1]


class Kernel:
    """What to boot: the argument for `vng --run`, its release, its tree."""

    def __init__(self, spec):
        path = os.path.abspath(spec)
        self.tree = None
        if os.path.isdir(path):
            image = os.path.join(path, "arch/x86/boot/bzImage")
            if not os.path.isfile(image):
                raise UsageError(
                    f"{spec} is a directory but has no arch/x86/boot/bzImage: "
                    "build the kernel first (make bzImage modules, or vng --build)"
                )
            if not os.path.isfile(os.path.join(path, ".config")):
                raise UsageError(f"{spec} has a bzImage but no .config: not a build tree")
            self.tree = path
            self.image = image
            release_file = os.path.join(path, "include/config/kernel.release")
            try:
                with open(release_file) as f:
                    self.release = f.read().strip() or None
            except OSError:
                self.release = bzimage_release(image)
        elif os.path.isfile(path):
            self.image = path
            self.release = bzimage_release(path)
            if self.release is None:
                raise UsageError(f"{spec} is not an x86 bzImage (no HdrS setup header)")
        else:
            raise UsageError(f"kernel {spec} does not exist (want a bzImage or a build tree)")
        self.run_arg = self.tree or self.image


def boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def kvm_probe(image, timeout):
    """Boot `image` under KVM just far enough to see the kernel's first line.

    A working KVM guest prints "Linux version" within a second; a guest that
    hangs (nested KVM on some hosts stops right after the real-mode setup)
    prints nothing more, so silence until `timeout` means KVM is unusable.
    """
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise UsageError("qemu-system-x86_64 not found: run `bash vm/provision-vm.sh`")
    cmd = [
        qemu, "-accel", "kvm", "-m", "256", "-nodefaults", "-display", "none",
        "-monitor", "none", "-serial", "stdio", "-no-reboot", "-kernel", image,
        "-append", "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1",
    ]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    seen = threading.Event()

    def watch():
        buf = b""
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):
            buf = (buf + chunk)[-4096:]
            if PROBE_MARK in buf:
                seen.set()
                return

    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    try:
        reader.join(timeout)
    finally:
        _kill_group(proc)   # also when stopped meanwhile
    return seen.is_set()


def choose_accel(mode, probe_image, probe_timeout):
    """Return ("kvm" | "tcg", why)."""
    if mode in ("kvm", "tcg"):
        return mode, "asked for"
    if not os.path.exists("/dev/kvm"):
        return "tcg", "no /dev/kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "/dev/kvm not accessible"
    bid = boot_id()
    try:
        with open(ACCEL_CACHE) as f:
            cached_bid, accel = f.read().split()
        if cached_bid == bid and accel in ("kvm", "tcg"):
            return accel, f"probed earlier this host boot ({ACCEL_CACHE})"
    except (OSError, ValueError):
        pass
    log(f"probing KVM with a {probe_timeout:g} s boot of {probe_image} ...")
    start = time.monotonic()
    ok = kvm_probe(probe_image, probe_timeout)
    accel = "kvm" if ok else "tcg"
    why = (
        f"KVM guest printed its banner in {time.monotonic() - start:.1f} s"
        if ok
        else f"KVM guest silent for {probe_timeout:g} s (hangs on this host)"
    )
    if bid:
        try:
            os.makedirs(os.path.dirname(ACCEL_CACHE), exist_ok=True)
            with open(ACCEL_CACHE, "w") as f:
                f.write(f"{bid} {accel}\n")
        except OSError:
            pass
    return accel, why


def _kill_group(proc):
    """End the process group we started for `proc` (vng, qemu and their
    helpers: the session's leader may be gone while qemu still runs).  A
    second Ctrl-C meanwhile must not leave the group half-ended: the stop
    signals wait until it is done."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 5
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            proc.poll()
            time.sleep(0.1)
        if _group_alive(proc.pid):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _group_alive(pgid):
    """Whether any process of the group is left (zombies included: a
    child not yet reaped counts until its parent, us or vng, reaps it)."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def write_job(workdir, kernel, pytest_args, extra_env=()):
    """The guest's command, as a script: the kernel command line that carries
    `vng --exec` is limited to 2 KiB, pytest arguments are not."""
    env = dict(extra_env)
    env["CTCTL_IN_VM"] = "1"
    if kernel.release:
        env["CTCTL_EXPECT_KERNEL"] = kernel.release
    if kernel.tree:
        env["CTCTL_KERNEL_TREE"] = kernel.tree
    lines = ["#!/bin/sh"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    lines.append(
        "exec bash "
        + shlex.quote(os.path.join(REPO, "vm/guest-run.sh"))
        + "".join(" " + shlex.quote(a) for a in pytest_args)
    )
    job = os.path.join(workdir, "job.sh")
    with open(job, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(job, 0o755)
    return job


def vng_command(kernel, accel, job, memory, cpus):
    vng = os.path.join(VNG_VENV, "bin", "vng")
    if not os.access(vng, os.X_OK):
        raise UsageError(f"{vng} not found: run `bash vm/provision-vm.sh`")
    cmd = [vng, "--run", kernel.run_arg, "--memory", memory, "--cpus", str(cpus),
           "--overlay-rwdir", REPO, "--cwd", REPO, "--exec", f"sh {job}"]
    if accel == "tcg":
        cmd.append("--disable-kvm")
    return cmd


def run_guest(cmd, timeout, log_path=None):
    """Run vng and echo its output.

    Returns what was seen: "status" (vng's, None on timeout), "release" and
    "pytest" (the guest's kernel release and pytest's status, as the guest
    reported them), and "booted", "tested", "total": seconds from the start
    until the guest reported its kernel, until pytest ended, until vng exited.
    """
    env = dict(os.environ)
    # vng runs virtme-run from PATH.
    env["PATH"] = os.path.join(VNG_VENV, "bin") + os.pathsep + env.get("PATH", "")
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=REPO,
    )
    log(f"guest started: vng pid {proc.pid}, process group {proc.pid}")
    found = {"done": 0}
    start = time.monotonic()
    log_file = open(log_path, "w") if log_path else None

    def pump():
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            print(line, flush=True)
            if log_file:
                print(line, file=log_file, flush=True)
            m = GUEST_KERNEL_RE.match(line)
            if m:
                found["release"] = m.group(1)
                found["booted"] = time.monotonic() - start
            m = GUEST_EXIT_RE.match(line)
            if m:
                found["pytest"] = int(m.group(1))
                found["tested"] = time.monotonic() - start
            m = COLLECTED_RE.search(line)
            if m:
                found["total_tests"] = int(m.group(1)) - int(m.group(2) or 0)
            if RESULT_RE.search(line):
                found["done"] += 1

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    status = None
    try:
        while True:
            left = timeout - (time.monotonic() - start)
            if left <= 0:
                _kill_group(proc)
                break
            try:
                status = proc.wait(min(left, PROGRESS_EVERY))
                break
            except subprocess.TimeoutExpired:
                log(progress(found, time.monotonic() - start))
    except Stopped:
        _kill_group(proc)
        raise
    finally:
        reader.join(5)
        if log_file:
            log_file.close()
            log_file = None
    found["status"] = status
    found["total"] = time.monotonic() - start
    return found


def progress(found, elapsed):
    """One line on how far the guest got: booting, or tests done of all."""
    clock = f"{int(elapsed // 60)} min {int(elapsed % 60)} s"
    if "release" not in found:
        return f"{clock}: the guest is booting"
    if "total_tests" not in found:
        return f"{clock}: the guest is up ({found['release']}), pytest is collecting"
    done, total = found["done"], found["total_tests"]
    pct = f" ({100 * done // total} %)" if total else ""
    return f"{clock}: {done} of {total} tests done{pct}"


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  vm/vmrun.py -- tests/vm -v                 Debian's kernel, KVM if it works
  vm/vmrun.py --kernel ~/linux -- -m vm -v   a kernel build tree
  vm/vmrun.py --accel tcg --kernel /boot/vmlinuz-6.1.0-56-amd64 -- tests/bpf
""",
    )
    ap.add_argument("--kernel", default=os.environ.get("KERNEL") or None,
                    help="bzImage or kernel build tree (default: newest /boot/vmlinuz-*-amd64)")
    ap.add_argument("--accel", choices=("auto", "kvm", "tcg"),
                    default=os.environ.get("VM_ACCEL") or "auto")
    ap.add_argument("--timeout", type=float, default=1800,
                    help="hard limit for boot and tests, seconds (default 1800)")
    ap.add_argument("--probe-timeout", type=float, default=15,
                    help="how long a KVM probe boot may stay silent (default 15)")
    ap.add_argument("--memory", default="2G")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="set a variable for the tests in the guest (repeatable)")
    ap.add_argument("--log", help="also write the guest's output to this file")
    ap.add_argument("--dry-run", action="store_true", help="print the vng command and exit")
    ap.add_argument("pytest_args", nargs="*", help="arguments for pytest in the guest (after --)")
    args = ap.parse_args(argv)

    if os.geteuid() != 0:
        log("must run as root: the tests in the guest load BPF and make namespaces, "
            "and /boot's kernel images are root-only")
        return EXIT_USAGE
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop)
    try:
        return run(args)
    except Stopped as stop:
        log(f"stopped by {stop}: the guest's process group is ended")
        return 128 + stop.signum


def run(args):
    try:
        extra_env = []
        for item in args.env:
            name, eq, value = item.partition("=")
            if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise UsageError(f"--env wants NAME=VALUE, got {item!r}")
            extra_env.append((name, value))
        kernel = Kernel(args.kernel or default_kernel())
        # The probe asks about the host's KVM, not the kernel: prefer the
        # distribution's image, whose serial console is known to work.
        try:
            probe_image = default_kernel()
        except UsageError:
            probe_image = kernel.image
        accel, why = choose_accel(args.accel, probe_image, args.probe_timeout)
        workdir = tempfile.mkdtemp(prefix="ctctl-vm-")
        try:
            job = write_job(workdir, kernel, args.pytest_args or ["-m", "vm", "-v"], extra_env)
            cmd = vng_command(kernel, accel, job, args.memory, args.cpus)
            log(f"kernel {kernel.run_arg} (release {kernel.release or 'unknown'})")
            log(f"accelerator {accel}: {why}")
            if args.dry_run:
                print(shlex.join(cmd))
                with open(job) as f:
                    print(f.read(), end="")
                return 0
            if args.log:
                os.makedirs(os.path.dirname(os.path.abspath(args.log)), exist_ok=True)
            seen = run_guest(cmd, args.timeout, args.log)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    except UsageError as exc:
        log(str(exc))
        return EXIT_USAGE

    status, release, pytest_status = seen["status"], seen.get("release"), seen.get("pytest")
    parts = []
    if "booted" in seen:
        parts.append(f"boot {seen['booted']:.0f} s")
        if "tested" in seen:
            parts.append(f"tests {seen['tested'] - seen['booted']:.0f} s")
    parts.append(f"total {seen['total']:.0f} s")
    timing = ", ".join(parts)
    log(f"guest kernel {release or 'never reported'}, accelerator {accel}; {timing}")
    if status is None:
        log(f"TIMEOUT: killed the guest after {args.timeout:g} s")
        return EXIT_TIMEOUT
    if pytest_status is None:
        log(f"the guest ended (vng status {status}) before pytest finished: "
            "see its output above")
        return EXIT_NO_GUEST
    if kernel.release and release != kernel.release:
        log(f"the guest ran {release}, not the {kernel.release} that was asked for")
        return EXIT_WRONG_KERNEL
    if status != pytest_status:
        # vng hands back the guest command's status; a mismatch means the
        # guest did not shut down cleanly after the tests.
        log(f"vng returned {status} but pytest returned {pytest_status}")
        return status or pytest_status
    return pytest_status


if __name__ == "__main__":
    sys.exit(main())
