# SPDX-License-Identifier: GPL-2.0
"""Host-side checks of vm/vmrun.py that need neither root nor a guest: how it
reads a kernel's release and how it refuses what it cannot boot."""

import glob
import importlib.util
import os
import struct
import subprocess
import sys

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
