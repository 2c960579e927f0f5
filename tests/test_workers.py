"""engine=processes: worker processes replaced periodically or when they die; same evaluated set as inline."""

import os
import re
import signal

import pytest

from tests.test_engine import (
    _evaluated,
    _order_rules_hold,
    autobert_matches_inline,
    lts_config,
    lts_keys,
    search_killing_a_worker,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _worker_pids() -> list[int]:
    """Worker processes started by this process (``python -m nasjax.search.workers``)."""
    me, out = str(os.getpid()), []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = f.read().rsplit(")", 1)[1].split()[1]
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if ppid == me and b"nasjax.search.workers" in cmd:
            out.append(int(name))
    return out


@pytest.mark.slow
def test_processes_search_matches_inline_recycles_survives_a_kill_and_resumes(search_config, tmp_path):
    from nasjax.search.run import run_search

    quiet = lambda *a: None  # noqa: E731
    cfg = lambda **o: search_config(**{"search.in_flight": 2, **o})  # noqa: E731
    inline = run_search(cfg(), str(tmp_path / "inline"), log=quiet)
    assert inline.evaluations == 7
    want = _evaluated(tmp_path / "inline")

    def kill(eng) -> bool:  # SIGKILL a busy worker (a segfault or an OOM kill looks the same)
        busy = [s.proc.pid for s in eng.slots if s is not None and s.job is not None]
        if busy:
            os.kill(busy[0], signal.SIGKILL)
        return bool(busy)

    workdir = tmp_path / "proc"
    logs = []
    settings = {"search.max_evaluations": 5, "process_recycle_every": 2}
    run = lambda: run_search(cfg(engine="processes", **settings), str(workdir), log=logs.append)  # noqa: E731
    out, eng = search_killing_a_worker(run, workdir, kill)
    assert out.status == "finished" and out.evaluations == 5 and out.extra["engine"] == "processes"
    assert eng.restarts >= 1 and any("died (SIGKILL" in line and "re-issuing" in line for line in logs), logs
    assert eng.recycled >= 1, logs  # 5 candidates on 2 workers, replaced every 2
    got = _evaluated(workdir)
    assert all(event == "finished" for _, event, _ in got.values()), got  # the killed job was re-run
    assert not _worker_pids(), "workers outlived the search"

    # a new controller resumes from the journal with new workers: the same set as inline
    out = run_search(cfg(engine="processes"), str(workdir), log=quiet)
    assert out.evaluations == 7
    assert _evaluated(workdir) == want
    _order_rules_hold(workdir, 2)
    assert not _worker_pids()


_CRASH_HOOK = """
import os
import nasjax.search.engine as engine

_run_job = engine.run_job
_MARK = os.environ["NASJAX_TEST_CRASH_MARK"]


def run_job(adapter, job, should_stop=None):  # the first trained candidate after 0 crashes every worker
    if job.stage == "train" and job.key > 0:
        if not os.path.exists(_MARK):
            with open(_MARK, "w") as f:
                f.write(str(job.key))
        with open(_MARK) as f:
            if int(f.read()) == job.key:
                os._exit(70)
    return _run_job(adapter, job, should_stop)


engine.run_job = run_job
"""


def test_a_job_that_keeps_killing_workers_fails_its_candidate_only(search_config, tmp_path, monkeypatch):
    """A candidate whose evaluation crashes every worker is recorded as failed; the search finishes."""
    from nasjax.search.journal import read_journal
    from nasjax.search.run import run_search

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_CRASH_HOOK)  # imported by the workers' interpreters only
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), ROOT, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("NASJAX_TEST_CRASH_MARK", str(tmp_path / "crashed_candidate"))
    logs = []
    settings = {"search.max_evaluations": 5, "process_max_restarts": 1, "search.hurdles": 0}
    out = run_search(search_config(engine="processes", **settings), str(tmp_path / "w"), log=logs.append)
    assert out.status == "finished" and out.evaluations == 5
    crashed = int((tmp_path / "crashed_candidate").read_text())
    got = _evaluated(tmp_path / "w")
    assert got[crashed][1] == "failed" and got[0][1] == "finished", got
    fail = next(
        r
        for r in read_journal(str(tmp_path / "w" / "journal.jsonl"))
        if r.get("id") == crashed and r["event"] == "failed"
    )
    assert fail["stage"] == "internal" and "worker process died 2x (exit code 70)" in fail["reason"], fail
    assert any(got[i][1] == "finished" for i in range(crashed + 1, 5)), got  # the search went on
    assert sum("re-issuing" in line for line in logs) == 1, logs


def test_processes_settings_are_checked_before_a_search_starts(search_config, tmp_path):
    from nasjax.config import load_config_file
    from nasjax.search.engine import EngineError, check_engine_settings
    from nasjax.search.run import run_search

    with pytest.raises(EngineError, match="process_recycle_every must be >= 0"):
        run_search(search_config(engine="processes", process_recycle_every=-1), str(tmp_path / "a"))
    with pytest.raises(EngineError, match="engine=processes with search.in_flight > 1 and train.budget_seconds"):
        check_engine_settings(search_config(engine="processes", **{"search.in_flight": 2, "train.budget_seconds": 5.0}))
    lts = load_config_file(os.path.join(ROOT, "configs/search/lts.py:cpu"))
    lts.engine = "processes"
    check_engine_settings(lts)  # LTS: one worker process, so its measurements are not disturbed


def test_a_worker_that_cannot_start_stops_the_search_with_its_reason(search_config):
    from nasjax.data.tokenizers import ByteTokenizer
    from nasjax.search.engine import EngineError
    from nasjax.search.workers import ProcessEngine

    cfg = search_config(engine="processes")
    cfg.mesh.shape = (3, 5)
    with pytest.raises(EngineError, match="a worker process failed to start: MeshError: mesh.shape must have 3"):
        ProcessEngine(cfg, ByteTokenizer(), 1, log=lambda *a: None)


def test_lts_measures_in_one_worker_process(text_dir, tmp_path):
    """LTS's measurements run in a worker process (crash isolation); the same architectures and counts."""
    from nasjax.search.journal import read_journal
    from nasjax.search.run import run_search

    run_search(lts_config(text_dir, tmp_path), str(tmp_path / "inline"), log=lambda *a: None)
    out = run_search(lts_config(text_dir, tmp_path, engine="processes"), str(tmp_path / "proc"), log=lambda *a: None)
    assert out.status == "finished"
    assert lts_keys(tmp_path / "proc") == lts_keys(tmp_path / "inline") and len(lts_keys(tmp_path / "inline")) == 4

    def counts(workdir):
        recs = read_journal(os.path.join(workdir, "journal.jsonl"))
        return sorted((r["key"], r["decoder_params"]) for r in recs if r["event"] == "measured")

    assert counts(tmp_path / "proc") == counts(tmp_path / "inline")


def test_a_worker_that_exits_while_starting_is_a_clear_error(search_config, monkeypatch):
    import sys

    from nasjax.data.tokenizers import ByteTokenizer
    from nasjax.search.engine import EngineError
    from nasjax.search.workers import ProcessEngine

    monkeypatch.setattr(sys, "executable", "/bin/false")  # an interpreter that dies at once
    with pytest.raises(EngineError, match=r"a worker process exited while starting \(exit code 1\)"):
        ProcessEngine(search_config(engine="processes"), ByteTokenizer(), 1, log=lambda *a: None)


@pytest.mark.slow
def test_autobert_ships_supernet_snapshots_to_worker_processes(autobert_config, tmp_path):
    """AutoBERT-Zero's supernet travels in the jobs, so worker processes evaluate what inline does."""
    autobert_matches_inline(autobert_config, tmp_path, "processes")


def test_a_worker_above_process_max_mb_is_replaced_and_results_do_not_change(search_config, tmp_path):
    """A memory bound below any worker's footprint replaces the worker after every job: same results."""
    from nasjax.search.run import run_search

    kw = {"search.max_evaluations": 3, "search.hurdles": 0}
    run_search(search_config(**kw), str(tmp_path / "inline"), log=lambda *a: None)
    logs = []
    out = run_search(search_config(engine="processes", process_max_mb=1, **kw), str(tmp_path / "p"), log=logs.append)
    assert out.status == "finished" and out.evaluations == 3
    assert _evaluated(tmp_path / "p") == _evaluated(tmp_path / "inline")
    line = next(x for x in logs if "workers replaced" in x)
    assert "replaced 0x after process_recycle_every candidates" in line, line
    assert re.search(r", [1-9][0-9]*x above process_max_mb", line), line
    assert not _worker_pids()


def test_processes_on_an_accelerator_need_preallocation_off(search_config, monkeypatch):
    import jax

    from nasjax.data.tokenizers import ByteTokenizer
    from nasjax.search.engine import EngineError
    from nasjax.search.workers import ProcessEngine

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    with pytest.raises(EngineError, match="engine=processes on a gpu host: .*XLA_PYTHON_CLIENT_PREALLOCATE=false"):
        ProcessEngine(search_config(engine="processes"), ByteTokenizer(), 2, log=lambda *a: None)
