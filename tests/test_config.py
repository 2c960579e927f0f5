"""Every config file and preset loads; misspelt keys are errors that name the key."""

import glob
import os
import subprocess
import sys

import pytest

from nasjax.config import ConfigFileError, apply_overrides, load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True))


def _presets(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return list(getattr(mod, "PRESETS", {None: None}))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_config_and_preset_loads(path):
    for preset in _presets(path):
        cfg = load_config_file(f"{path}:{preset}" if preset else path)
        assert cfg.seed == 0
        assert cfg.train.steps > 0
        assert len(cfg.mesh.shape) == 3


def test_config_files_exist():
    names = {os.path.relpath(p, ROOT) for p in CONFIG_FILES}
    assert {"configs/train/lm.py", "configs/train/mlm.py", "configs/train/finetune.py"} <= names


def test_unknown_preset_and_missing_file():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        load_config_file(os.path.join(ROOT, "configs/train/lm.py:huge"))
    with pytest.raises(ConfigFileError, match="not found"):
        load_config_file("configs/train/nope.py")


def test_unknown_key_is_an_error():
    cfg = load_config_file(os.path.join(ROOT, "configs/train/lm.py:tiny"))
    with pytest.raises(KeyError, match="trian"):
        apply_overrides(cfg, {"trian.steps": 3})
    with pytest.raises(AttributeError, match="stepz"):
        cfg.train.stepz = 3


def test_cli_names_the_misspelt_key(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "nasjax.cli",
            "train",
            "--config=configs/train/lm.py:tiny",
            f"--workdir={tmp_path}/w",
            "--config.train.stepz=3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "stepz" in out.stderr and "Traceback" not in out.stderr
