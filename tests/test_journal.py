"""The search journal: round trip, a torn last line at every byte, corruption, the single-writer lock."""

import json
import math
import subprocess
import sys

import pytest

from nasjax.search.journal import Journal, JournalError, read_journal


class Log(list):
    def __call__(self, msg):
        self.append(msg)


def _three_record_journal(path):
    with Journal(path, log=Log()) as j:
        j.append("start", config={"population": 8, "name": "tiny"})
        j.append("evaluated", candidate=0, fitness=1.25, spec=[1, 2, 3])
        j.append("evaluated", candidate=1, fitness=None, note="diverged: ünïcode ok")
        return list(j.records)


def test_round_trip_and_seq_continues(tmp_path):
    path = tmp_path / "sub" / "dir" / "journal.jsonl"  # parents are created
    records = _three_record_journal(path)
    assert [r["seq"] for r in records] == [0, 1, 2]
    assert records[1]["spec"] == [1, 2, 3] and records[2]["fitness"] is None
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 4
    assert json.loads(lines[0]) == records[0]
    log = Log()
    with Journal(path, log=log) as j:
        assert j.records == records
        assert j.events("evaluated") == records[1:]
        assert j.events() == records and j.events("start", "evaluated") == records
        rec = j.append("done", best=0)
        assert rec["seq"] == 3 and rec["event"] == "done" and isinstance(rec["time"], float)
    assert log == []
    assert read_journal(path, log=log) == records + [rec]
    assert log == []


def test_released_records_are_not_held_and_appends_go_on(tmp_path):
    """A search's controller releases the records once replayed (bounded memory); the file
    keeps them, and later appends keep their order."""
    path = tmp_path / "journal.jsonl"
    records = _three_record_journal(path)
    with Journal(path, log=Log()) as j:
        j.release_records()
        for read in (lambda: j.records, lambda: j.events(), lambda: j.events("evaluated")):
            with pytest.raises(JournalError, match="released from memory.*read_journal"):
                read()
        assert "records released" in repr(j)
        assert j.next_seq == 3
        more = [j.append("evaluated", candidate=i, fitness=float(i)) for i in range(3, 6)]
        assert [r["seq"] for r in more] == [3, 4, 5] and j.next_seq == 6
    assert read_journal(path, log=Log()) == records + more


def test_blank_lines_ignored(tmp_path):
    path = tmp_path / "journal.jsonl"
    records = _three_record_journal(path)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"\n" + lines[0] + b"  \n\n" + lines[1] + lines[2] + b"\n\n")
    before = path.read_bytes()
    log = Log()
    with Journal(path, log=log) as j:
        assert j.records == records
    assert log == [] and path.read_bytes() == before


def test_torn_last_line_at_every_byte(tmp_path):
    src = tmp_path / "src.jsonl"
    records = _three_record_journal(src)
    data = src.read_bytes()
    start = data.rindex(b"\n", 0, len(data) - 1) + 1  # start of the last line
    good = data[:start]
    for cut in range(start, len(data)):  # up to "only the newline is missing"
        d = tmp_path / f"cut{cut}"
        path = d / "journal.jsonl"
        d.mkdir()
        path.write_bytes(data[:cut])
        dropped = cut - start

        ro_log = Log()
        assert read_journal(path, log=ro_log) == records[:2]
        assert path.read_bytes() == data[:cut]  # read-only never modifies
        assert not list(d.glob("*.torn-*"))
        assert len(ro_log) == (1 if dropped else 0)

        log = Log()
        with Journal(path, log=log) as j:
            assert j.records == records[:2]
            assert path.read_bytes() == good
            torn_files = list(d.glob("journal.jsonl.torn-*"))
            if dropped:
                assert len(log) == 1
                assert str(path) in log[0] and f"byte {start}" in log[0] and f"{dropped} bytes" in log[0]
                assert [t.name for t in torn_files] == [f"journal.jsonl.torn-{start}"]
                assert torn_files[0].read_bytes() == data[start:cut]
            else:
                assert log == [] and torn_files == []
            rec = j.append("evaluated", candidate=2, fitness=0.5)
            assert rec["seq"] == 2
        lines = path.read_bytes().split(b"\n")
        assert len(lines) == 4 and lines[-1] == b""
        log2 = Log()
        with Journal(path, log=log2) as j:
            assert j.records == records[:2] + [rec]
        assert log2 == []


@pytest.mark.parametrize(
    "tail",
    [b"[1, 2]\n", b'{"seq": 3}\n', b"garbage\n", b"\xff\xfe\n", b'{"event": "x", "f": NaN}\n', b"   "],
    ids=["list", "no-event", "garbage", "utf8", "nan", "whitespace"],
)
def test_bad_last_line_with_newline_is_torn(tmp_path, tail):
    path = tmp_path / "journal.jsonl"
    records = _three_record_journal(path)
    good = path.read_bytes()
    path.write_bytes(good + tail)
    log = Log()
    with Journal(path, log=log) as j:
        assert j.records == records
    assert path.read_bytes() == good
    assert len(log) == 1 and f"{len(tail)} bytes" in log[0]
    assert (tmp_path / f"journal.jsonl.torn-{len(good)}").read_bytes() == tail


def test_torn_twice_at_same_offset_keeps_both_copies(tmp_path):
    path = tmp_path / "journal.jsonl"
    _three_record_journal(path)
    good = path.read_bytes()
    for tail in (b'{"event": "a', b'{"event": "b'):
        path.write_bytes(good + tail)
        Journal(path, log=Log()).close()
    copies = sorted(p.read_bytes() for p in tmp_path.glob("journal.jsonl.torn-*"))
    assert copies == [b'{"event": "a', b'{"event": "b']


@pytest.mark.parametrize("bad", [b"not json\n", b'{"event": "x"\n', b'{"no_event": 1}\n', b"3\n"])
def test_corrupt_middle_line_raises(tmp_path, bad):
    path = tmp_path / "journal.jsonl"
    _three_record_journal(path)
    lines = path.read_bytes().splitlines(keepends=True)
    corrupted = b"\n" + lines[0] + bad + lines[1] + lines[2]  # the bad line is line 3 (blank lines count)
    path.write_bytes(corrupted)
    for read_only in (False, True):
        with pytest.raises(JournalError, match=r"line 3\b") as e:
            Journal(path, read_only=read_only, log=Log())
        assert str(path) in str(e.value)
    assert path.read_bytes() == corrupted
    assert not list(tmp_path.glob("*.torn-*"))
    Journal(path.with_name("other.jsonl")).close()  # the failed writer released its lock...
    path.write_bytes(b"".join(lines))
    Journal(path, log=Log()).close()  # ...on this path too


def test_single_writer_lock(tmp_path):
    path = tmp_path / "journal.jsonl"
    first = Journal(path)
    first.append("start")
    with pytest.raises(JournalError, match="lock") as e:
        Journal(path)
    assert "another process is writing" in str(e.value) and f"{path}.lock" in str(e.value)
    assert [r["event"] for r in read_journal(path)] == ["start"]  # readers do not need the lock
    first.close()
    first.close()  # idempotent
    with pytest.raises(JournalError, match="closed"):
        first.append("late")
    with Journal(path) as second:
        second.append("resumed")
        assert [r["seq"] for r in second.records] == [0, 1]


def test_lock_held_by_another_process_and_released_when_it_dies(tmp_path):
    path = tmp_path / "journal.jsonl"
    code = (
        "import sys; from nasjax.search.journal import Journal; j = Journal(sys.argv[1]); j.append('start');"
        "print('ready', flush=True); sys.stdin.read()"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"ready"
        with pytest.raises(JournalError, match=f"lock .* held.*pid {child.pid}"):
            Journal(path)
        assert [r["event"] for r in read_journal(path)] == ["start"]
    finally:
        child.kill()  # a killed writer's flock goes with it
        child.wait()
    with Journal(path) as j:
        assert j.append("resumed")["seq"] == 1


def test_read_only_and_missing(tmp_path):
    path = tmp_path / "journal.jsonl"
    with pytest.raises(JournalError, match="no journal at .*search workdir"):
        Journal(path, read_only=True)
    with pytest.raises(JournalError, match="no journal"):
        read_journal(path)
    assert not path.exists()
    _three_record_journal(path)
    before = path.read_bytes()
    with Journal(path, read_only=True) as j:
        with pytest.raises(JournalError, match="read-only"):
            j.append("x")
    assert path.read_bytes() == before


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, {"a": [1.0, math.nan]}, object(), {1, 2}])
def test_unstorable_field_rejected_and_nothing_written(tmp_path, value):
    path = tmp_path / "journal.jsonl"
    _three_record_journal(path)
    before = path.read_bytes()
    with Journal(path) as j:
        with pytest.raises(ValueError, match="fitness"):
            j.append("evaluated", candidate=3, fitness=value)
        assert len(j.records) == 3
        assert j.append("evaluated", candidate=3, fitness=None)["seq"] == 3  # seq not consumed
    assert path.read_bytes().startswith(before)


@pytest.mark.parametrize("key", ["event", "seq", "time"])
def test_reserved_keys_rejected(tmp_path, key):
    path = tmp_path / "journal.jsonl"
    with Journal(path) as j:
        with pytest.raises(ValueError, match="reserved"):
            j.append("x", **{key: 1})
        with pytest.raises(ValueError):
            j.append("")
    assert path.read_bytes() == b""


def test_odd_seq_is_replayed_as_is(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text('{"event":"a","seq":5}\n{"event":"b","seq":"x"}\n{"event":"c","seq":2}\n{"event":"d"}\n')
    with Journal(path, log=Log()) as j:
        assert [r.get("seq") for r in j.records] == [5, "x", 2, None]
        assert j.append("e")["seq"] == 6
