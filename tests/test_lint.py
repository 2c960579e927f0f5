"""House style is enforced in CI: ruff lint and format over the package, tests, configs, benchmarks."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = ["nasjax", "tests", "configs", "benchmarks"]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is in the test extra")
@pytest.mark.parametrize("args", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(args):
    out = subprocess.run(["ruff", *args, *TARGETS], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_core_imports_without_tensorflow_or_ray():
    code = (
        "import sys, nasjax.cli, nasjax.train.run, nasjax.models, nasjax.data;"
        "bad=[m for m in ('tensorflow','tensorflow_datasets','seqio','ray') if m in sys.modules];"
        "assert not bad, bad"
    )
    out = subprocess.run(["python", "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
