"""LTS search driver: a tiny training-free search, its exports, resume without re-measuring."""

from __future__ import annotations

import csv
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_SPACE = {
    "n_layer": (1, 2),
    "d_model": (32, 64),
    "d_inner": (64, 96, 128, 160, 192, 224, 256),
    "n_head": (2, 4),
    "d_inner_ratio": 1.7,
    "min_params": 0,
    "max_params": 0,
}


@pytest.fixture
def lts_config(text_dir, tmp_path):
    def make(**overrides):
        from nasjax.config import apply_overrides, load_config_file

        cfg = load_config_file(os.path.join(ROOT, "configs/search/lts.py:cpu"))
        base = {
            "data.path": str(text_dir),
            "data.val_files": "doc_5.txt",
            "data.seq_len": 16,
            "data.cache_dir": str(tmp_path / "cache"),
            "search.population_size": 6,
            "search.iterations": 2,
            "lts.parent_size": 2,
            "lts.mutation_size": 2,
            "lts.crossover_size": 2,
            "lts.seq_len": 16,
            "lts.latency_repeats": 2,
            "compile_cache_dir": str(tmp_path / "xla"),
        }
        base.update({f"lts.space.{k}": v for k, v in TINY_SPACE.items()})
        base.update(overrides)
        return apply_overrides(cfg, base)

    return make


def test_lts_search_exports_and_resumes_without_remeasuring(lts_config, tmp_path, monkeypatch):
    import nasjax.measure.hardware as hw
    from nasjax.search.journal import read_journal
    from nasjax.search.run import run_search
    from nasjax.spec import load_spec

    work = tmp_path / "lts"
    summary = run_search(
        lts_config(**{"search.iterations": 1, "lts.compile_threads": "2"}), str(work), log=lambda *a: None
    )
    assert summary.status == "finished"
    recs = read_journal(str(work / "journal.jsonl"))
    measured = [r for r in recs if r["event"] == "measured"]
    assert len(measured) >= 6
    for r in measured:  # analytic decoder params == counted (eval_shape) params
        assert r["decoder_params"] == r["counted_decoder_params"]
        assert r["latency_s"] > 0 and r["peak_memory_bytes"] > 0
    assert len([r for r in recs if r["event"] == "iteration"]) == 2
    # the population's pieces were compiled ahead on threads (lts.compile_threads=2), journaled
    # before its measurements, which then compiled none of their own
    ahead = [r for r in recs if r["event"] == "precompiled"]
    assert ahead[0]["iteration"] == 0 and ahead[0]["pieces"] > 0 and ahead[0]["seconds"] > 0
    assert ahead[0]["seq"] < min(r["seq"] for r in measured)
    assert sum(r["compiled_pieces"] for r in measured if r["iteration"] == 0) == 0
    own = sum(r["compile_seconds"] for r in measured)  # the summary adds what was compiled ahead
    assert summary.compile_seconds == pytest.approx(own + sum(r["seconds"] for r in ahead))

    # exports: front CSV/JSON, one trainable spec per member, plots
    front = json.loads((work / "pareto.json").read_text())["front"]
    assert front and len(list(csv.DictReader(open(work / "pareto.csv")))) == len(front)
    for entry in front:
        spec = load_spec(str(work / entry["spec"]))
        assert spec.name.startswith("lts-front-")
    assert (work / "params_vs_latency.png").exists() and (work / "front_over_iterations.png").exists()
    assert len(list(csv.DictReader(open(work / "results.csv")))) == len({r["key"] for r in measured})

    # resume with one more iteration: nothing already measured is measured again
    calls = []
    real = hw.measure_hardware

    def counting(spec, *a, **k):
        calls.append(spec.architecture_hash())
        return real(spec, *a, **k)

    monkeypatch.setattr(hw, "measure_hardware", counting)
    run_search(lts_config(), str(work), log=lambda *a: None)
    recs2 = read_journal(str(work / "journal.jsonl"))
    keys = [r["key"] for r in recs2 if r["event"] in ("measured", "failed")]
    assert len(keys) == len(set(keys))  # no architecture recorded twice
    assert len(calls) == len(keys) - len([r for r in recs if r["event"] in ("measured", "failed")])
    assert len([r for r in recs2 if r["event"] == "iteration"]) == 3


def test_lts_constraints_are_recorded(lts_config, tmp_path):
    from nasjax.search.journal import read_journal
    from nasjax.search.run import run_search

    cfg = lts_config(**{"search.iterations": 0, "lts.max_memory_bytes": 1})
    run_search(cfg, str(tmp_path / "c"), log=lambda *a: None)
    failed = [r for r in read_journal(str(tmp_path / "c" / "journal.jsonl")) if r["event"] == "failed"]
    assert failed and all(r["stage"] == "constraint" and "max_memory_bytes" in r["reason"] for r in failed)


def test_spearman():
    from nasjax.search.lts_validate import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)


def test_lts_validate_resumes(lts_config, tmp_path):
    from nasjax.search.journal import read_journal
    from nasjax.search.lts_validate import validate_proxies

    cfg = lts_config(**{"lts.validate_architectures": 3, "train.steps": 3, "train.batch_size": 8,
                        "train.eval_batches": 1, "lts.proxies": "grad_norm,synflow"})  # fmt: skip
    summary = validate_proxies(cfg, str(tmp_path / "v"), log=lambda *a: None)
    assert summary.n == 3
    assert {"decoder_params", "total_params", "flops", "grad_norm", "synflow"} <= set(summary.correlations)
    assert (tmp_path / "v" / "proxy_scatter.png").exists()
    n_records = len(read_journal(str(tmp_path / "v" / "journal.jsonl")))
    validate_proxies(cfg, str(tmp_path / "v"), log=lambda *a: None)  # nothing left to train
    assert len(read_journal(str(tmp_path / "v" / "journal.jsonl"))) == n_records


def test_a_journal_from_before_lts_programs_resumes_only_as_model(lts_config, tmp_path):
    """Journals written before ``lts.programs`` existed measured whole-model programs: they
    resume with ``lts.programs=model`` and are refused (naming the setting) with the new
    default, so one search never mixes the two kinds of measurement."""
    from nasjax.search.run import SearchError, run_search

    quiet = lambda *a: None  # noqa: E731
    work = tmp_path / "old"
    run_search(lts_config(**{"search.iterations": 0, "lts.programs": "model"}), str(work), log=quiet)
    path = work / "journal.jsonl"
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    del header["config"]["lts"]["programs"]  # as a journal of an older nasjax
    lines[0] = json.dumps(header, sort_keys=True, separators=(",", ":"))
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SearchError, match="lts.programs: 'model' -> 'sublayers'"):
        run_search(lts_config(**{"search.iterations": 1}), str(work), log=quiet)
    summary = run_search(lts_config(**{"search.iterations": 1, "lts.programs": "model"}), str(work), log=quiet)
    assert summary.status == "finished"


def test_lts_settings_are_checked_before_measuring(lts_config, tmp_path):
    from nasjax.search.engine import EngineError
    from nasjax.search.run import run_search

    for key, value, message in (
        ("lts.programs", "kernels", "lts.programs: expected one of model, sublayers, layers, got 'kernels'"),
        ("lts.max_pieces", 0, "lts.max_pieces: expected an int >= 1, got 0"),
        ("lts.compile_threads", "0", "lts.compile_threads: expected auto or an int >= 1, got 0"),
        ("lts.compile_threads", "many", "lts.compile_threads: expected auto or an int >= 1, got 'many'"),
    ):
        with pytest.raises(EngineError, match=message):
            run_search(lts_config(**{key: value}), str(tmp_path / key), log=lambda *a: None)
        assert not (tmp_path / key / "journal.jsonl").exists()  # refused before the journal


def test_compile_threads_setting(monkeypatch):
    """lts.compile_threads: auto is min(8, usable cores) on a CPU and 1 on a GPU (whose
    compiles time kernels); a count is taken as it is; anything else is refused by name."""
    import jax
    import ml_collections

    from nasjax.search.lts import MAX_COMPILE_THREADS, compile_threads

    def lts(value):
        return ml_collections.ConfigDict({"compile_threads": value})

    assert 1 <= compile_threads(lts("auto")) <= MAX_COMPILE_THREADS
    assert compile_threads(lts("3")) == compile_threads(lts(3)) == 3
    for bad in ("0", "-1", "many", 0, True):
        with pytest.raises(ValueError, match="lts.compile_threads: expected auto or an int >= 1"):
            compile_threads(lts(bad))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert compile_threads(lts("auto")) == 1 and compile_threads(lts("4")) == 4
