"""notebooks/quickstart.ipynb runs top to bottom on CPU (its code cells, in order, in a fresh process)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def test_notebook_is_valid_and_has_no_stored_outputs():
    nb = json.load(open(NOTEBOOK))
    assert nb["nbformat"] == 4 and nb["cells"]
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("markdown", "code") and isinstance(cell["source"], list)
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
            compile("".join(cell["source"]), NOTEBOOK, "exec")


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(text_dir, tmp_path):
    nb = json.load(open(NOTEBOOK))
    code = "\n\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    script = tmp_path / "quickstart.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # what a user's kernel sees: one CPU device
    env.update(MPLBACKEND="Agg", NASJAX_DATA=str(text_dir), NASJAX_WORK=str(tmp_path / "work"), NASJAX_REPO=ROOT)
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        cwd=os.path.dirname(NOTEBOOK),
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for expected in ("logits (2, 64, 262)", "evaluations, best", "architectures on the front", "student L"):
        assert expected in proc.stdout, proc.stdout[-3000:]
