"""The search journal: an append-only JSONL record of a search, the one thing resume replays.

Format: ``<workdir>/journal.jsonl``, one JSON object per line, each with ``"event"`` (what
happened), ``"seq"`` (0, 1, 2, ... in write order) and ``"time"`` (``time.time()`` of the
append) plus the event's own fields. Keys are sorted, separators compact, and only strict
JSON is written (non-finite floats are refused, so callers store e.g. a diverged fitness as
``null``). Blank lines are ignored.

Guarantees:
  * Durability: ``append`` returns only after the line is written, flushed and fsync'd.
  * One writer: a writer holds an exclusive ``flock`` on ``<journal>.lock`` until ``close``;
    a second writer fails at once with ``JournalError``. Readers (``read_only=True``) take no
    lock and may read while a search runs.
  * A crash never loses the search: a torn last line (no final newline, not JSON, or not an
    object with an ``"event"`` key) is reported, copied to ``<journal>.torn-<byte offset>``
    and truncated away, so replay yields every complete record and later appends give a
    clean file. A reader reports and skips it without touching any file.
  * Real corruption is never papered over: a bad line that is not the last one raises
    ``JournalError`` naming the file and line, and nothing is modified.

Memory: an open journal holds its records as parsed dicts, ~5x their size on disk (a
default Primer search's 1,000 evaluations: 3.5 MiB of file, 18 MiB and 240,000 Python
objects held; docs/benchmarks.md, stop 32). A search's controller replays them into its
own state and then calls :meth:`Journal.release_records`; the file keeps everything. What
the controller keeps per evaluation is then its own state: the result records it reuses
and counts, far less than every record with every genome.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

RESERVED = ("event", "seq", "time")


class JournalError(ValueError):
    """A journal that cannot be used as is: corrupt, missing, locked or read-only."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _problem(raw: bytes) -> tuple[dict | None, str | None]:
    """Parses one line; returns (record, None) or (None, what is wrong)."""
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        return None, "not valid UTF-8"
    except ValueError as e:
        return None, f"not valid JSON ({e})"
    if not isinstance(value, dict):
        return None, f"a JSON {type(value).__name__}, not an object"
    if "event" not in value:
        return None, 'an object without an "event" key'
    return value, None


def _storable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _write_all(fd: int, data: bytes) -> None:
    """Writes all of ``data`` (``os.write`` may write less) and fsyncs."""
    written = 0
    while written < len(data):
        written += os.write(fd, data[written:])
    os.fsync(fd)


def _fsync_dir(directory: pathlib.Path) -> None:
    """Makes a created or renamed directory entry durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Journal:
    """An open journal: its replayed ``records`` plus, unless read-only, the right to append.

    Args:
      path: the JSONL file. Created (with its parent directories) by a writer if missing.
      read_only: read without locking; ``append`` is refused and no file is ever modified.
      log: where a torn last line is reported.

    Raises:
      JournalError: a corrupt line other than the last, another writer holds the lock, or
        (read-only) there is no file.
    """

    def __init__(self, path: str | os.PathLike, *, read_only: bool = False, log: Callable[[str], None] = print):
        self.path = pathlib.Path(path)
        self.read_only = read_only
        self._records: list[dict] | None = []
        self._next_seq = 0
        self._log = log
        self._fd: int | None = None
        self._lock_fd: int | None = None
        if read_only:
            if not self.path.is_file():
                raise JournalError(f"no journal at {self.path} — is this a search workdir?")
            self._replay(self.path.read_bytes())
            return
        try:
            self._open_for_writing()
        except BaseException:
            self.close()
            raise

    def _open_for_writing(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._lock_fd, 32, 0).decode("ascii", "replace").strip()
            raise JournalError(
                f"another process is writing {self.path} (lock {lock_path} held); "
                + (f"it was taken by pid {holder}; " if holder.isdigit() else "")
                + "stop that search first, or open the journal read-only to look at its records"
            ) from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
        existed = self.path.exists()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if not existed:
            _fsync_dir(self.path.parent)
        self._replay(self.path.read_bytes())

    def _replay(self, data: bytes) -> None:
        """Parses every line; handles a torn tail; raises on corruption anywhere else."""
        lines = []  # non-blank lines: (1-based line number, end offset, bytes)
        pos = lineno = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            end = len(data) if nl < 0 else nl + 1
            lineno += 1
            if data[pos:end].strip():
                lines.append((lineno, end, data[pos:end]))
            pos = end
        records, good_end, torn = [], 0, None
        for i, (lineno, end, raw) in enumerate(lines):
            record, problem = _problem(raw)
            if i == len(lines) - 1:
                if problem is None and not raw.endswith(b"\n"):
                    problem = "no newline at the end (an incomplete write)"
                if problem is not None:
                    torn = problem
                    break
            elif problem is not None:
                raise JournalError(
                    f"{self.path}, line {lineno}: {problem}. Only the last line can be torn by a crash, so the "
                    "journal was changed by something else; repair or remove that line by hand (file left as is)"
                )
            records.append(record)
            good_end = end
        self._records = records
        seqs = [r["seq"] for r in records if isinstance(r.get("seq"), int) and not isinstance(r["seq"], bool)]
        self._next_seq = max(len(records), max(seqs, default=-1) + 1)
        if torn is None and data and not data.endswith(b"\n"):
            torn = "whitespace without a final newline"
        if torn is not None:
            self._drop_tail(data, good_end, torn)

    def _drop_tail(self, data: bytes, offset: int, problem: str) -> None:
        """Reports the torn bytes after ``offset``; a writer saves them aside and truncates them away."""
        n = len(data) - offset
        where = f"journal {self.path}: torn last line at byte {offset}, {problem} ({n} bytes dropped"
        if self.read_only:
            self._log(f"warning: {where}; skipped, file left as is since it was opened read-only)")
            return
        torn_path, k = self.path.with_name(f"{self.path.name}.torn-{offset}"), 1
        while True:
            try:
                fd = os.open(torn_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except FileExistsError:
                torn_path, k = self.path.with_name(f"{self.path.name}.torn-{offset}.{k}"), k + 1
        try:
            _write_all(fd, data[offset:])
        finally:
            os.close(fd)
        _fsync_dir(self.path.parent)
        os.ftruncate(self._fd, offset)
        os.fsync(self._fd)
        self._log(f"warning: {where}, copied to {torn_path}); truncated to the last complete record")

    @property
    def records(self) -> list[dict]:
        """Every record: those replayed when the journal was opened, then those appended.

        Raises:
          JournalError: after :meth:`release_records` (the file still holds them: ``read_journal``).
        """
        if self._records is None:
            raise JournalError(
                f"{self.path}: the records were released from memory (release_records); read the file "
                "with read_journal for them"
            )
        return self._records

    def release_records(self) -> None:
        """Drops the records held in memory, replayed and appended alike, and keeps no later
        ones: for a search's controller once it has replayed them (module docstring).
        ``append`` and ``next_seq`` go on as before; ``records`` and ``events`` raise."""
        self._records = None

    @property
    def next_seq(self) -> int:
        """The ``seq`` of the next append: after every replayed record and above every integer seq seen."""
        return self._next_seq

    def append(self, event: str, /, **fields: Any) -> dict:
        """Writes one record durably and returns it (as replay will read it back).

        Args:
          event: what happened (a non-empty string).
          **fields: the event's data; JSON-serialisable, finite floats only, no reserved keys.

        Raises:
          JournalError: the journal is read-only or closed.
          ValueError: a reserved key, a bad event name, or a value that cannot be stored (nothing is written).
        """
        if self.read_only:
            raise JournalError(f"{self.path} was opened read-only; append is refused")
        if self._fd is None:
            raise JournalError(f"{self.path} is closed")
        if not isinstance(event, str) or not event:
            raise ValueError(f"event must be a non-empty string, got {event!r}")
        reserved = sorted(set(fields) & set(RESERVED))
        if reserved:
            raise ValueError(f"fields may not use the reserved keys {reserved} (the journal sets them)")
        record = {"event": event, "seq": self._next_seq, "time": time.time(), **fields}
        try:
            line = json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as e:
            bad = [k for k, v in fields.items() if not _storable(v)] or sorted(fields)
            msg = f"cannot journal event {event!r}, field(s) {bad}: {e} (store non-finite numbers as None)"
            raise ValueError(msg) from None
        payload = (line + "\n").encode("utf-8")
        size = os.fstat(self._fd).st_size
        try:
            _write_all(self._fd, payload)
        except OSError:
            try:  # leave no partial line behind to become a corrupt middle line later
                os.ftruncate(self._fd, size)
            except OSError:
                pass
            raise
        record = json.loads(line)
        self._next_seq += 1
        if self._records is not None:
            self._records.append(record)
        return record

    def events(self, *names: str) -> list[dict]:
        """The records whose event is one of ``names`` (all records if none are given).

        Raises:
          JournalError: after :meth:`release_records`.
        """
        if not names:
            return list(self.records)
        return [r for r in self.records if r["event"] in names]

    def close(self) -> None:
        """Closes the file and releases the writer's lock (idempotent)."""
        for attr in ("_fd", "_lock_fd"):
            fd = getattr(self, attr)
            if fd is not None:
                setattr(self, attr, None)
                os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "read-only" if self.read_only else ("closed" if self._fd is None else "writer")
        held = "records released" if self._records is None else f"{len(self._records)} records"
        return f"Journal({str(self.path)!r}, {held}, {mode})"


def read_journal(path: str | os.PathLike, log: Callable[[str], None] = print) -> list[dict]:
    """The records of the journal at ``path``, read without locking (safe while a search runs)."""
    with Journal(path, read_only=True, log=log) as journal:
        return journal.records
