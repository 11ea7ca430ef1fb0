# SPDX-License-Identifier: GPL-2.0
"""Host-side checks of vm/vmrun.py: how it reads a kernel's release, how
it refuses what it cannot boot, what its progress lines say (none of these
need root or a guest), and that a runner stopped by a signal leaves no
guest behind (root and vng: the VM stage runs it before its guest)."""

import glob
import importlib.util
import os
import re
import signal
import struct
import subprocess
import sys
import threading

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VMRUN = os.path.join(REPO, "vm", "vmrun.py")


@pytest.fixture(scope="module")
def vmrun():
    spec = importlib.util.spec_from_file_location("ctctl_vmrun", VMRUN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_bzimage(path, version):
    """A file with just the x86 boot protocol's setup header fields that
    carry the version string, and the string itself."""
    image = bytearray(0x1000)
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x20E, 0x600)
    text = version.encode() + b"\0"
    image[0x800 : 0x800 + len(text)] = text
    path.write_bytes(bytes(image))
    return str(path)


def test_release_is_read_from_the_setup_header(vmrun, tmp_path):
    img = fake_bzimage(tmp_path / "bzImage", "6.9.0-rc1-test (me@box) #3 SMP")
    assert vmrun.bzimage_release(img) == "6.9.0-rc1-test"


@pytest.mark.skipif(not glob.glob("/boot/vmlinuz-*-amd64") or os.geteuid() != 0,
                    reason="needs Debian's kernel image (vm/provision-vm.sh) and root to read it")
def test_release_of_debian_image_matches_its_file_name(vmrun):
    for img in glob.glob("/boot/vmlinuz-*-amd64"):
        assert vmrun.bzimage_release(img) == os.path.basename(img)[len("vmlinuz-"):]


def test_not_a_bzimage_is_refused(vmrun, tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x7fELF" + bytes(0x1000))
    assert vmrun.bzimage_release(str(junk)) is None
    with pytest.raises(vmrun.UsageError, match="not an x86 bzImage"):
        vmrun.Kernel(str(junk))


def test_missing_kernel_is_refused(vmrun, tmp_path):
    with pytest.raises(vmrun.UsageError, match="does not exist"):
        vmrun.Kernel(str(tmp_path / "nope"))


def test_unbuilt_tree_is_refused(vmrun, tmp_path):
    with pytest.raises(vmrun.UsageError, match="no arch/x86/boot/bzImage"):
        vmrun.Kernel(str(tmp_path))


def test_build_tree_release_comes_from_kernel_release(vmrun, tmp_path):
    boot = tmp_path / "arch/x86/boot"
    boot.mkdir(parents=True)
    fake_bzimage(boot / "bzImage", "6.12.0 (x) #1")
    (tmp_path / ".config").write_text("CONFIG_BPF=y\n")
    (tmp_path / "include/config").mkdir(parents=True)
    (tmp_path / "include/config/kernel.release").write_text("6.12.0-mine\n")
    k = vmrun.Kernel(str(tmp_path))
    assert (k.tree, k.release, k.run_arg) == (str(tmp_path), "6.12.0-mine", str(tmp_path))


def test_cli_reports_bad_kernel_without_a_traceback(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("vmrun.py refuses to run without root before it looks at the kernel")
    res = subprocess.run([sys.executable, VMRUN, "--kernel", str(tmp_path / "nope"),
                          "--accel", "tcg", "--dry-run"], capture_output=True, text=True)
    assert res.returncode == 64
    assert "does not exist" in res.stderr and "Traceback" not in res.stderr


def test_progress_says_how_far_the_guest_got(vmrun):
    assert vmrun.progress({"done": 0}, 61) == "1 min 1 s: the guest is booting"
    assert "pytest is collecting" in vmrun.progress({"done": 0, "release": "6.1.0-57-amd64"}, 90)
    line = vmrun.progress({"done": 95, "release": "6.1.0-57-amd64", "total_tests": 380}, 3000)
    assert line == "50 min 0 s: 95 of 380 tests done (25 %)"
    # What the counters read from pytest's -v output in the guest.
    # As the VM stage's guest prints it (-v), and without a deselection.
    m = vmrun.COLLECTED_RE.search("collecting ... collected 2008 items / 1990 deselected / 18 selected")
    assert int(m.group(1)) - int(m.group(2)) == 18
    m = vmrun.COLLECTED_RE.search("collected 3 items")
    assert (m.group(1), m.group(2)) == ("3", None)
    assert vmrun.RESULT_RE.search("tests/bpf/test_parse.py::test_x[ipv4] PASSED     [  3%]")
    assert not vmrun.RESULT_RE.search("ctctl-vm: pytest exit status: 0")


VNG = os.path.join(REPO, ".venv-vm", "bin", "vng")


def group_members(pgid: int) -> list[int]:
    """The processes of a process group, read from /proc (the 5th field of
    stat, after the command name in parentheses)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            out.append(int(entry))
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.skipif(os.geteuid() != 0 or not os.access(VNG, os.X_OK) or not glob.glob("/boot/vmlinuz-*-amd64"),
                    reason="needs root, vng (vm/provision-vm.sh, the VM stage runs it) and Debian's kernel")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stopped_runner_ends_its_guest(sig):
    """Stopped while its guest runs (Ctrl-C, or a CI's time limit), the
    runner ends the guest's whole process group, vng and qemu, and exits
    with 128 + the signal.  The guest is a real one: the signal comes as
    soon as its qemu runs, so the test does not wait for a boot."""
    from ctctl.lab.waiting import wait_until

    proc = subprocess.Popen([sys.executable, VMRUN, "--accel", "tcg", "--timeout", "600", "--",
                             "tests/vm/test_vmrun.py", "-k", "release"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=REPO)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    pgid = None
    try:
        def started():
            return next((int(m.group(1)) for m in map(GUEST_RE.search, list(lines)) if m), None)
        wait_until(lambda: started() is not None or proc.poll() is not None, 120, "the runner to start vng")
        pgid = started()
        assert pgid is not None, lines
        wait_until(lambda: any("qemu" in cmdline(p) for p in group_members(pgid)), 120,
                   "qemu to run in the guest's process group")
        os.kill(proc.pid, sig)
        assert proc.wait(60) == 128 + sig, lines
        wait_until(lambda: not group_members(pgid), 30, "the guest's processes to be gone")
        assert any("stopped by" in line for line in lines), lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if pgid is not None and group_members(pgid):
            os.killpg(pgid, signal.SIGKILL)   # the group the runner started for this test


GUEST_RE = re.compile(r"guest started: vng pid \d+, process group (\d+)")
