"""The training config (one table of keys), the command line, and the machine."""
import subprocess
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused_without_page_faults():
    """After reuse_freed_memory (the CLIs call it at start), a freed 64 MB block, which glibc
    would unmap on free and map afresh, is reused without page-faulting it in again."""
    script = (
        "import ctypes, resource, sys; sys.path.insert(0, '.'); import config\n"
        "applied = config.reuse_freed_memory() if sys.argv[1] == 'on' else False\n"
        "libc = ctypes.CDLL('libc.so.6')\n"
        "libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        "def use(n=64 << 20):\n"
        "    block = libc.malloc(n); ctypes.memset(block, 1, n); libc.free(block)\n"
        "use()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(5):\n"
        "    use()\n"
        "print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * resource.getpagesize() >> 20)"
    )
    faulted = {}
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True)
        applied, faulted[mode] = out.stdout.split()[0] == "True", int(out.stdout.split()[1])
    assert applied and faulted["off"] >= 256 and faulted["on"] < 4, faulted  # MB faulted in
