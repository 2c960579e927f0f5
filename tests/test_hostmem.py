"""nasjax.hostmem: freed host-heap pages kept for XLA's next execution, and given back on demand."""

import os
import subprocess
import sys

import pytest

from nasjax import hostmem

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

# In a fresh process: import nasjax (which applies NASJAX_HOST_HEAP), then malloc, touch
# and free 256 MiB, printing resident MiB after the free and after malloc_trim.
_PROBE = """
import ctypes, nasjax
from nasjax import hostmem
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
n = 256 << 20
before = rss()
p = libc.malloc(n)
ctypes.memset(p, 1, n)
libc.free(ctypes.c_void_p(p))
freed = rss() - before
hostmem.release_free_memory()
print(freed, rss() - before)
"""


def _probe(mode: str):
    env = dict(os.environ, **{hostmem.ENV: mode})
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [float(x) for x in out.stdout.split()]


@pytest.mark.skipif(hostmem._libc() is None or not os.path.exists("/proc/self/status"), reason="glibc, Linux only")
def test_freed_pages_stay_resident_for_reuse_until_released():
    kept, released = _probe("reuse")
    assert kept > 200  # a 256 MiB block freed under the raised threshold stays in the heap
    assert released < 50  # and malloc_trim hands it back
    dropped, _ = _probe("system")
    assert dropped < 50  # glibc's defaults: mmap'd, unmapped on free


def test_an_unknown_mode_stops_the_import_with_the_variable_named():
    env = dict(os.environ, **{hostmem.ENV: "huge"})
    out = subprocess.run([sys.executable, "-c", "import nasjax"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0
    assert "NASJAX_HOST_HEAP='huge' is not one of reuse, system" in out.stderr


def test_threshold_bounds_are_checked():
    with pytest.raises(ValueError, match="threshold_bytes"):
        hostmem.keep_freed_pages(0)
    with pytest.raises(ValueError, match="threshold_bytes"):
        hostmem.keep_freed_pages(2**31)
