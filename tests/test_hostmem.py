"""nasjax.hostmem: freed host-heap pages kept for XLA's next execution, and given back on demand."""

import os
import subprocess
import sys

import pytest

from nasjax import hostmem

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

# In a fresh process: import nasjax (which applies NASJAX_HOST_HEAP), then malloc, touch
# and free 256 MiB, on the main thread or on a new one (as XLA:CPU's workers do),
# printing resident MiB after the free and after malloc_trim.
_PROBE = """
import ctypes, sys, threading, nasjax
from nasjax import hostmem
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
def cycle():
    p = libc.malloc(256 << 20)
    ctypes.memset(p, 1, 256 << 20)
    libc.free(ctypes.c_void_p(p))
if sys.argv[2] == "training":
    hostmem.for_training()
before = rss()
if sys.argv[1] == "thread":
    t = threading.Thread(target=cycle)
    t.start()
    t.join()
else:
    cycle()
freed = rss() - before
hostmem.release_free_memory()
print(freed, rss() - before)
"""


def _probe(mode: str, where: str, entry: str = "import"):
    env = dict(os.environ, **{hostmem.ENV: mode})
    cmd = [sys.executable, "-c", _PROBE, where, entry]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [float(x) for x in out.stdout.split()]


@pytest.mark.skipif(hostmem._libc() is None or not os.path.exists("/proc/self/status"), reason="glibc, Linux only")
@pytest.mark.parametrize(
    "mode, where, entry, kept",
    [
        ("auto", "main", "import", True),  # thresholds raised at import
        ("auto", "thread", "import", False),  # a thread arena's 64 MiB heaps: mmap'd whatever the threshold
        ("auto", "thread", "training", True),  # for_training: one arena
        ("one_arena", "thread", "import", True),
        ("reuse", "thread", "training", False),  # an explicit mode wins over for_training
        ("system", "main", "training", False),  # glibc's defaults: mmap'd, unmapped on free
    ],
)
def test_freed_pages_stay_resident_where_the_mode_keeps_them(mode, where, entry, kept):
    freed, released = _probe(mode, where, entry)
    if kept:
        assert freed > 200  # the freed 256 MiB block stays in the heap for the next execution
        assert released < 50  # and malloc_trim hands it back
    else:
        assert freed < 50


def test_an_unknown_mode_stops_the_import_with_the_variable_named():
    env = dict(os.environ, **{hostmem.ENV: "huge"})
    out = subprocess.run([sys.executable, "-c", "import nasjax"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0
    assert "NASJAX_HOST_HEAP='huge' is not one of auto, reuse, one_arena, system" in out.stderr
