"""The launch scripts parse their arguments and say what is missing before touching anything."""

import os
import subprocess

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


@pytest.mark.parametrize(
    "script,args,message",
    [
        ("tpu_vm.sh", [], "error: missing --name=TPU_NAME --zone=ZONE --config=FILE[:preset] --workdir=DIR"),
        ("tpu_vm.sh", ["--name=a", "--zone=z", "--config=c.py", "--workdir=w", "--create"], "--accelerator=TYPE"),
        ("tpu_vm.sh", ["--bogus"], "error: unknown argument --bogus"),
        ("gpu_local.sh", ["--config=configs/search/primer.py:tiny"], "error: missing --workdir=DIR"),
        ("gpu_local.sh", ["--config=configs/search/primer.py:tiny", "--workdir=w", "--per_gpu=0"], "--per_gpu must"),
        ("ray_search.sh", [], "needs --config=FILE[:preset] and --workdir=DIR"),
    ],
)
def test_scripts_check_their_arguments(script, args, message):
    path = os.path.join(ROOT, "launch", script)
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    proc = subprocess.run(["bash", path, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
