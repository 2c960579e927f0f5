"""Local text corpora: resolving paths and splitting train from validation by whole files.

Validation text must never be seen in training, and neighbouring windows of one file are
strongly correlated, so the split is by whole files (documents). Only a corpus of a
single file falls back to holding out the tail of that file, and the split says so in
its ``note`` so the trainer can log it.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import glob
import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from nasjax.data.errors import DataError

__all__ = ["DataError", "FileSplit", "read_documents", "resolve_files", "split_files"]

_GLOB_CHARS = set("*?[")


def resolve_files(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Resolves a data path to the list of text files it names.

    Args:
        path: a file; a folder (every ``*.txt`` directly inside it); a glob such as
            ``"corpus/**/*.txt"``; or a list of any of these.

    Returns:
        Sorted, de-duplicated file paths (sorted per entry, entries in the given order).

    Raises:
        DataError: naming the path when it does not exist or matches no file.
    """
    if isinstance(path, list | tuple):
        out: list[Path] = []
        for item in path:
            out += [p for p in resolve_files(item) if p not in out]
        if not out:
            raise DataError("data.path is an empty list")
        return out
    text = os.fspath(path)
    expanded = Path(text).expanduser()
    if any(c in text for c in _GLOB_CHARS) and not expanded.exists():
        files = sorted(Path(p) for p in glob.glob(str(expanded), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"data path glob {text!r} matches no file")
        return files
    if expanded.is_file():
        return [expanded]
    if expanded.is_dir():
        files = sorted(p for p in expanded.glob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"data folder {text!r} holds no *.txt files")
        return files
    raise DataError(f"data path {text!r} does not exist (a file, a folder of .txt files, or a glob)")


@dataclasses.dataclass(frozen=True)
class FileSplit:
    """Train and validation files; unpacks as ``train, val = split``.

    Attributes:
        train: training files.
        val: validation files.
        tail_fraction: when set, ``train`` and ``val`` are the same single file: training
            reads its head and validation its last ``tail_fraction`` of characters.
        note: a human-readable sentence describing the split, for the run log.
    """

    train: tuple[Path, ...]
    val: tuple[Path, ...]
    tail_fraction: float | None = None
    note: str = ""

    def __iter__(self) -> Iterator[tuple[Path, ...]]:
        return iter((self.train, self.val))

    def describe(self) -> list[list[str]]:
        """A JSON-able description, used to key token caches."""
        return [[str(p) for p in self.train], [str(p) for p in self.val], [repr(self.tail_fraction)]]


def split_files(
    files: Sequence[str | os.PathLike],
    val_files: Sequence[str] | str = (),
    val_fraction: float = 0.05,
    seed: int = 0,
) -> FileSplit:
    """Splits files into training and validation by whole files.

    Args:
        files: the corpus files (e.g. from ``resolve_files``).
        val_files: validation files by basename or glob (matched against the basename and
            the full path). When given, ``val_fraction`` and ``seed`` are ignored.
        val_fraction: fraction of files held out when ``val_files`` is empty:
            ``max(1, round(val_fraction * n))`` files, chosen by a hash of each basename
            with ``seed``, so the choice is stable when files are added or reordered.
        seed: changes which files are held out.

    Returns:
        A ``FileSplit``. With a single file and no ``val_files``, both sides hold that
        file and ``tail_fraction = val_fraction`` (its last characters are validation).

    Raises:
        DataError: if a named validation file matches nothing, or no training file is left.
    """
    paths = [Path(f) for f in files]
    if not paths:
        raise DataError("no data files to split")
    if isinstance(val_files, str):
        val_files = [v for v in val_files.split(",") if v.strip()]
    if val_files:
        chosen: set[Path] = set()
        for name in val_files:
            name = name.strip()
            hits = {p for p in paths if fnmatch.fnmatch(p.name, name) or fnmatch.fnmatch(str(p), name)}
            if not hits:
                close = difflib.get_close_matches(name, [p.name for p in paths], n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise DataError(f"validation file {name!r} matches none of the {len(paths)} data files{hint}")
            chosen |= hits
        train = tuple(p for p in paths if p not in chosen)
        val = tuple(p for p in paths if p in chosen)
        if not train:
            raise DataError(f"data.val_files {list(val_files)} hold out every file; nothing is left to train on")
        return FileSplit(train, val, note=f"validation on named files: {', '.join(p.name for p in val)}")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(paths) == 1:
        note = (
            f"single file {paths[0].name}: holding out its last {val_fraction:.0%} of text for validation "
            "(give several files to validate on whole documents)"
        )
        return FileSplit((paths[0],), (paths[0],), tail_fraction=val_fraction, note=note)
    k = min(max(1, round(val_fraction * len(paths))), len(paths) - 1)

    def rank(p: Path) -> tuple[str, str]:
        return hashlib.sha256(f"{seed}:{p.name}".encode()).hexdigest(), str(p)

    held = set(sorted(paths, key=rank)[:k])
    train = tuple(p for p in paths if p not in held)
    val = tuple(p for p in paths if p in held)
    note = f"validation on {k} of {len(paths)} files (seed {seed}): {', '.join(p.name for p in val)}"
    return FileSplit(train, val, note=note)


def read_documents(split: FileSplit, which: str) -> Iterator[str]:
    """Yields the text of each document on one side of a split.

    Args:
        split: a ``FileSplit``.
        which: ``"train"`` or ``"val"``.

    Yields:
        One string per file (UTF-8; undecodable bytes become U+FFFD so one bad byte does
        not stop a run). With ``tail_fraction`` set, the head or tail of the single file,
        cut at a line break near the boundary so no line is split between the two sides.
    """
    if which not in ("train", "val"):
        raise ValueError(f"which must be 'train' or 'val', got {which!r}")
    for path in split.train if which == "train" else split.val:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise DataError(f"cannot read data file {path}: {e}") from e
        if split.tail_fraction is not None:
            cut = _tail_cut(text, split.tail_fraction)
            text = text[:cut] if which == "train" else text[cut:]
        yield text


def _tail_cut(text: str, fraction: float) -> int:
    cut = int(len(text) * (1.0 - fraction))
    newline = text.find("\n", cut)
    # Prefer a line boundary, unless it would move the cut by more than 1% of the text.
    if newline != -1 and newline + 1 < len(text) and newline - cut <= max(1, len(text) // 100):
        return newline + 1
    return cut
