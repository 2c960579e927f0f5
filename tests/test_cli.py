"""The command line as a user runs it (subprocesses, real flags)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nasjax(*args, timeout=300):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "nasjax.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


def test_help_lists_commands():
    out = nasjax("--help")
    assert out.returncode == 0
    for cmd in ("train", "eval", "describe", "finetune", "data fetch"):
        assert cmd in out.stdout


def test_describe_zoo_model_by_name():
    out = nasjax("describe", "bert", "--size=base")
    assert out.returncode == 0, out.stderr
    assert "7,087,872" in out.stdout  # one BERT-base layer
    assert "non-embedding" in out.stdout and "FLOPs per token" in out.stdout


def test_describe_spec_json_and_bad_json(tmp_path):
    from nasjax.models import get_spec

    good = tmp_path / "spec.json"
    good.write_text(get_spec("primer", "tiny").to_json())
    out = nasjax("describe", str(good))
    assert out.returncode == 0, out.stderr
    assert "dconv" in out.stdout
    bad = tmp_path / "bad.json"
    data = json.loads(good.read_text())
    data["layers"][1]["mixer"]["n_heads"] = "four"
    bad.write_text(json.dumps(data))
    out = nasjax("describe", str(bad))
    assert out.returncode == 2
    assert "layers[1].mixer.n_heads" in out.stderr and "Traceback" not in out.stderr


def test_train_eval_and_malformed_spec(text_dir, tmp_path):
    wd = tmp_path / "run"
    common = [
        "--config=configs/train/lm.py:tiny",
        f"--config.data.path={text_dir}",
        "--config.data.val_files=doc_5.txt",
        "--config.data.seq_len=32",
        "--config.train.batch_size=4",
        "--config.train.eval_batches=2",
        f"--config.data.cache_dir={tmp_path / 'cache'}",
        "--config.compile_cache_dir=none",
        "--config.model.name=primer_ez",
    ]
    out = nasjax("train", f"--workdir={wd}", "--config.train.steps=4", *common)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tok/s" in out.stderr and "ETA" in out.stderr
    assert (wd / "loss_curve.png").exists()
    out = nasjax("eval", f"--workdir={wd}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "perplexity" in out.stdout and "bits per byte" in out.stdout

    # the run's spec.json trains again through --config.model.spec
    out = nasjax(
        "train",
        f"--workdir={tmp_path / 'again'}",
        "--config.train.steps=2",
        f"--config.model.spec={wd / 'spec.json'}",
        *common,
    )
    assert out.returncode == 0, out.stderr[-2000:]

    bad = tmp_path / "bad.json"
    bad.write_text('{"kind": "decoder", "layers": [{"mixer": {"kind": "attention", "variant": "nope"}}]}')
    out = nasjax("train", f"--workdir={tmp_path / 'bad'}", f"--config.model.spec={bad}", *common)
    assert out.returncode == 2
    assert "layers[0].mixer.variant" in out.stderr and "Traceback" not in out.stderr
