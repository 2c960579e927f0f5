"""Engines: N evaluations in flight, inline or on Ray actors, with the same evaluated set."""

import os
import re
import threading
import time

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


@pytest.fixture
def primer_config(search_config):
    """The shared tiny Primer search with two evaluations in flight."""

    def make(**overrides):
        return search_config(**{"search.in_flight": 2, **overrides})

    return make


def _evaluated(workdir) -> dict:
    """id -> (genome hash, event, fitness rounded, cached_from) of every result in the journal."""
    from nasjax.search.journal import read_journal

    recs = read_journal(os.path.join(workdir, "journal.jsonl"))
    props = {r["id"]: r for r in recs if r["event"] == "proposed"}
    out = {}
    for r in recs:
        if r["event"] in ("finished", "failed"):
            assert r["id"] not in out, f"candidate {r['id']} has two results"
            fit = r.get("fitness")
            out[r["id"]] = (props[r["id"]]["hash"], r["event"], None if fit is None else round(fit, 4))
    return out


def _order_rules_hold(workdir, n: int) -> None:
    """Candidate j was asked only after j - n's result was journaled (told in id order)."""
    from nasjax.search.journal import read_journal

    recs = read_journal(os.path.join(workdir, "journal.jsonl"))
    seq_result = {r["id"]: r["seq"] for r in recs if r["event"] in ("finished", "failed")}
    for r in recs:
        if r["event"] == "proposed" and r["id"] >= n:
            earlier = [seq_result[i] for i in range(r["id"] - n + 1) if i in seq_result]
            assert len(earlier) == r["id"] - n + 1 and max(earlier) < r["seq"], r


def test_inline_in_flight_search_resumes_on_the_same_set(primer_config, tmp_path):
    from nasjax.search.run import run_search

    quiet = lambda *a: None  # noqa: E731
    full = run_search(primer_config(), str(tmp_path / "full"), log=quiet)
    assert full.status == "finished" and full.evaluations == 7 and full.extra["in_flight"] == 2
    want = _evaluated(tmp_path / "full")
    assert sorted(want) == list(range(7))
    _order_rules_hold(tmp_path / "full", 2)
    part = tmp_path / "part"
    run_search(primer_config(**{"search.max_evaluations": 4}), str(part), log=quiet)
    run_search(primer_config(), str(part), log=quiet)
    assert _evaluated(part) == want
    with pytest.raises(Exception, match="search.in_flight"):
        run_search(primer_config(**{"search.in_flight": 1}), str(part), log=quiet)
    # engine=threads: two candidates at once in this process, the same evaluated set
    threads = run_search(primer_config(engine="threads"), str(tmp_path / "threads"), log=quiet)
    assert threads.status == "finished" and threads.extra["engine"] == "threads"
    assert _evaluated(tmp_path / "threads") == want
    _order_rules_hold(tmp_path / "threads", 2)


def test_unknown_engine_is_a_clear_error(primer_config, tmp_path):
    from nasjax.search.engine import EngineError
    from nasjax.search.run import run_search

    with pytest.raises(EngineError, match="engine must be one of inline, threads, processes, ray"):
        run_search(primer_config(engine="spark"), str(tmp_path / "s"), log=lambda *a: None)
    with pytest.raises(EngineError, match="search.in_flight must be at least 1"):
        run_search(primer_config(**{"search.in_flight": 0}), str(tmp_path / "s"), log=lambda *a: None)
    with pytest.raises(EngineError, match="engine=threads with train.budget_seconds"):
        run_search(primer_config(engine="threads", **{"train.budget_seconds": 5.0}), str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()  # rejected before a journal was created


def test_segmented_settings_are_checked_before_a_search_starts(primer_config):
    """The Trainer checks every train.segmented_* setting whether or not train.segmented is
    on, so the search does too, before a journal exists (not at every candidate)."""
    from nasjax.search.engine import EngineError, check_engine_settings

    cases = [
        ({"train.segmented_max_mb": -1}, "train.segmented_max_mb=-1: expected an int >= 0"),
        ({"train.segmented_layout": "packed"}, "train.segmented_layout='packed': expected one of"),
        ({"train.segmented_pieces": "ops"}, "train.segmented_pieces='ops': expected one of"),
    ]
    for overrides, message in cases:
        for on in (True, False):
            with pytest.raises(EngineError, match=re.escape(message)):
                check_engine_settings(primer_config(**{"train.segmented": on, **overrides}))


def test_threads_engine_refuses_lts(tmp_path):
    from nasjax.config import load_config_file
    from nasjax.search.engine import EngineError, check_engine_settings

    cfg = load_config_file(os.path.join(ROOT, "configs/search/lts.py:cpu"))
    cfg.engine = "threads"
    with pytest.raises(EngineError, match="engine=threads .* search.method=lts"):
        check_engine_settings(cfg)


def search_killing_a_worker(run, workdir, kill):
    """Runs ``run()`` (a search in ``workdir``) while a thread calls ``kill(engine)`` from the first
    started candidate on until it returns True (it killed a busy worker); returns (run's result, engine)."""
    import nasjax.search.engine as engine_mod

    engines, make, killed = [], engine_mod.make_engine, []
    journal = workdir / "journal.jsonl"

    def capture(*args, **kw):
        engines.append(make(*args, **kw))
        return engines[-1]

    def killer():
        deadline = time.time() + 300
        while time.time() < deadline:
            if engines and journal.exists() and '"event":"started"' in journal.read_text() and kill(engines[0]):
                killed.append(True)
                return
            time.sleep(0.05)

    engine_mod.make_engine = capture
    try:
        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        out = run()
        thread.join(timeout=5)
    finally:
        engine_mod.make_engine = make
    assert killed, "no busy worker was seen to kill"
    return out, engines[0]


def lts_config(text_dir, tmp_path, **kw):
    """A 4-architecture LTS search (population only) over the synthetic corpus."""
    from nasjax.config import apply_overrides, load_config_file

    base = {
        "data.path": str(text_dir),
        "data.val_files": "doc_5.txt",
        "data.seq_len": 16,
        "data.cache_dir": str(tmp_path / "cache"),
        "search.population_size": 4,
        "search.iterations": 0,
        "lts.seq_len": 16,
        "lts.latency_repeats": 2,
        "lts.space.n_layer": (1, 2),
        "lts.space.d_model": (32, 64),
        "lts.space.d_inner": (64, 96, 128),
        "lts.space.n_head": (2, 4),
        "lts.space.min_params": 0,
        "lts.space.max_params": 0,
    }
    base.update(kw)
    return apply_overrides(load_config_file(os.path.join(ROOT, "configs/search/lts.py:cpu")), base)


def lts_keys(workdir) -> list:
    """(architecture key, event) of every LTS measurement in the journal."""
    from nasjax.search.journal import read_journal

    recs = read_journal(os.path.join(workdir, "journal.jsonl"))
    return sorted((r["key"], r["event"]) for r in recs if r["event"] in ("measured", "failed"))


# ---------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_cluster():
    """A 2-CPU local Ray for this module (the Ray tests skip, the others run, without ray)."""
    ray = pytest.importorskip("ray", reason="engine=ray needs ray (pip install 'nasjax[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_ray_search_matches_inline_survives_a_killed_actor_and_resumes(ray_cluster, primer_config, tmp_path):
    from nasjax.search.run import run_search

    ray = ray_cluster
    quiet = lambda *a: None  # noqa: E731
    inline = run_search(primer_config(), str(tmp_path / "inline"), log=quiet)
    assert inline.evaluations == 7
    want = _evaluated(tmp_path / "inline")

    # a Ray search with 2 actors; one actor is killed while it evaluates the first candidate
    def kill(eng) -> bool:
        busy = [slot for slot, _ in eng.running.values()]
        if busy:
            ray.kill(eng.actors[busy[0]], no_restart=True)
        return bool(busy)

    workdir = tmp_path / "ray"
    logs = []
    cfg = primer_config(engine="ray", **{"search.max_evaluations": 4})
    out, eng = search_killing_a_worker(lambda: run_search(cfg, str(workdir), log=logs.append), workdir, kill)
    assert out.status == "finished" and out.evaluations == 4 and out.extra["engine"] == "ray"
    assert eng.restarts >= 1, logs
    assert any("re-issuing" in line for line in logs), logs
    got = _evaluated(workdir)
    assert all(event == "finished" for _, event, _ in got.values()), got  # the killed job was re-run

    # the controller stops (here: the limit) and a new one resumes from the journal on Ray
    out = run_search(primer_config(engine="ray"), str(workdir), log=quiet)
    assert out.evaluations == 7
    assert _evaluated(workdir) == want  # the same architectures and results as the inline search
    _order_rules_hold(workdir, 2)


@pytest.mark.ray
def test_ray_lts_measures_a_population_on_two_actors(ray_cluster, text_dir, tmp_path):
    """LTS (training-free) hands its measurements to the actors; the first population is the same."""
    from nasjax.search.run import run_search

    cfg = lambda **kw: lts_config(text_dir, tmp_path, **kw)  # noqa: E731

    run_search(cfg(), str(tmp_path / "inline"), log=lambda *a: None)
    out = run_search(cfg(engine="ray", ray_actors=2), str(tmp_path / "ray"), log=lambda *a: None)
    assert out.status == "finished"
    assert lts_keys(tmp_path / "ray") == lts_keys(tmp_path / "inline") and len(lts_keys(tmp_path / "inline")) == 4


@pytest.mark.ray
@pytest.mark.slow
def test_ray_autobert_ships_supernet_snapshots_and_matches_inline(ray_cluster, autobert_config, tmp_path):
    """AutoBERT-Zero on 2 actors: children inherit the supernet as it was when they were asked,
    trained weights come back to the controller, and the evaluated set equals the inline one."""
    autobert_matches_inline(autobert_config, tmp_path, "ray")


def autobert_matches_inline(autobert_config, tmp_path, engine: str) -> None:
    """An AutoBERT-Zero search with 2 in flight on ``engine`` evaluates what inline does, and its
    workers' trained weights reach the controller's supernet."""
    from nasjax.search.journal import read_journal
    from nasjax.search.run import run_search

    kw = {"search.in_flight": 2, "search.max_evaluations": 4}
    run_search(autobert_config(**kw), str(tmp_path / "inline"), log=lambda *a: None)
    out = run_search(autobert_config(engine=engine, **kw), str(tmp_path / engine), log=lambda *a: None)
    assert out.status == "finished" and out.evaluations == 4
    assert _evaluated(tmp_path / engine) == _evaluated(tmp_path / "inline")
    recs = read_journal(os.path.join(tmp_path / engine, "journal.jsonl"))
    assert [r["version"] for r in recs if r["event"] == "supernet"]  # trained weights reached the supernet
    assert all(r.get("inherited", 1) > 0 for r in recs if r["event"] == "finished" and not r.get("cached_from"))
