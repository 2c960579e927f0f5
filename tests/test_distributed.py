"""Several JAX processes (hosts) evaluating candidates on one mesh, on CPU over loopback."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_watchdog_ends_a_hung_block_with_exit_code_4():
    code = (
        "import time\nfrom nasjax.distributed import Watchdog\n"
        "with Watchdog(0.5, 'a test collective'):\n    time.sleep(30)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 4 and "a test collective did not finish in 0.5s" in proc.stderr


def test_explicit_coordinator_needs_count_and_index():
    from nasjax.distributed import maybe_initialize

    with pytest.raises(ValueError, match="needs --num_processes"):
        maybe_initialize("127.0.0.1:1234", 0, -1)


@pytest.mark.slow
def test_two_processes_search_on_one_mesh_and_agree(text_dir, tmp_path):
    """Process 0 proposes and journals; process 1 runs every job in lockstep; both compute the same fitness."""
    overrides = {
        "data.path": str(text_dir),
        "data.val_files": "doc_5.txt",
        "data.seq_len": 32,
        "data.cache_dir": str(tmp_path / "cache"),
        "train.batch_size": 8,
        "train.steps": 4,
        "train.warmup_steps": 1,
        "search.hurdles": 0,
        "search.population_size": 2,
        "search.tournament_size": 1,
        "search.max_evaluations": 3,
        "search.d_model": 32,
        "search.n_layers": 1,
        "search.n_heads": 2,
        "search.d_ff": 64,
        "search.val_batches": 2,
        "compile_cache_dir": "none",
        "collective_timeout_s": 300,
    }
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    procs = []
    for i in range(2):
        cmd = [
            sys.executable,
            "-m",
            "nasjax.cli",
            "search",
            "--config=" + os.path.join(ROOT, "configs/search/primer.py:tiny"),
            f"--workdir={tmp_path / f'p{i}'}",
            f"--coordinator=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
        ] + [f"--config.{k}={v}" for k, v in overrides.items()]
        procs.append(
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        )
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "process 0 of 2: 2 local devices" in outs[0] and "process 1 of 2" in outs[1], outs
    assert "devices 4 mesh" in outs[0], outs[0]  # one mesh over both processes' devices
    recs = [json.loads(line) for line in open(tmp_path / "p0" / "journal.jsonl")]
    journal = {r["id"]: r["fitness"] for r in recs if r["event"] == "finished" and r.get("cached_from") is None}
    follower = {int(m[0]): float(m[1]) for m in re.findall(r"job (\d+) train ok=True fitness=([0-9.eE+-]+)", outs[1])}
    assert journal and set(follower) == set(journal), (journal, outs[1])
    for cid, fitness in journal.items():
        assert abs(follower[cid] - fitness) < 1e-6, (cid, follower[cid], fitness)
    assert not (tmp_path / "p1" / "journal.jsonl").exists()  # only process 0 writes the journal
