"""Tests for nasjax.data: tokenizers, file splits, LM and MLM batches, resumable iterators."""

import json
import math

import numpy as np
import pytest

from nasjax import data
from nasjax.data import pipeline

WORDS = "the quick brown fox jumps over lazy dog héllo wörld naïve café ✓ 日本 data search token".split()


def _write_corpus(folder, n_files=10, words_per_file=400, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = [" ".join(rng.choice(WORDS, 10)) for _ in range(words_per_file // 10)]
        (folder / f"doc_{i:02d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture
def corpus(tmp_path):
    return _write_corpus(tmp_path / "corpus")


def _text_data(corpus, tmp_path, **kw):
    args = dict(val_files=["doc_03.txt"], seq_len=32, global_batch_size=8, seed=0, cache_dir=tmp_path / "cache")
    args.update(kw)
    return data.make_text_data(corpus, log=lambda _: None, **args)


# --- tokenizers ----------------------------------------------------------------------


def test_byte_tokenizer_round_trip_and_bytes():
    tok = data.ByteTokenizer()
    text = "héllo wörld ✓ 日本 😀\n"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.min() >= 6 and tok.vocab_size == 262
    assert tok.decode(ids) == text
    assert tok.num_bytes(ids) == len(text.encode("utf-8"))
    with_specials = np.concatenate([[tok.cls_id], ids, [tok.sep_id, tok.eos_id, tok.pad_id]])
    assert tok.decode(with_specials) == text and tok.num_bytes(with_specials) == len(text.encode())
    assert (tok.pad_id, tok.eos_id, tok.mask_id, tok.cls_id, tok.sep_id) == (0, 1, 2, 3, 4)
    assert isinstance(data.tokenizer_from_config(json.loads(json.dumps(tok.to_config()))), data.ByteTokenizer)


def test_sentencepiece_trains_round_trips_and_is_reused(corpus, tmp_path, monkeypatch):
    files = sorted(corpus.glob("*.txt"))
    tok = data.make_tokenizer("sentencepiece", files, vocab_size=400, model_dir=tmp_path / "tok", log=lambda _: None)
    assert 263 < tok.vocab_size <= 400
    assert (tok.pad_id, tok.eos_id, tok.mask_id, tok.cls_id, tok.sep_id) == (0, 1, 4, 5, 6)
    for text in ["the quick brown fox\n  jumps", "unseen Zebra ✓ 😀 [MASK] x", (corpus / "doc_01.txt").read_text()]:
        ids = tok.encode(text)
        assert ids.dtype == np.int32 and tok.decode(ids) == text
        assert tok.num_bytes(ids) == len(text.encode("utf-8"))
        assert not np.isin(ids, tok.special_ids).any()  # literal "[MASK]" stays text
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")  # it learned pieces
    long_text = (corpus / "doc_02.txt").read_text() * 60  # > one encode chunk
    assert tok.decode(tok.encode(long_text)) == long_text

    for config in (tok.to_config(), tok.to_config(embed=True)):
        again = data.tokenizer_from_config(json.loads(json.dumps(config)))
        assert again.fingerprint() == tok.fingerprint()
        assert np.array_equal(again.encode("lazy dog"), tok.encode("lazy dog"))

    def no_training(*a, **k):
        raise AssertionError("retrained instead of reusing the model file")

    monkeypatch.setattr(data.SentencePieceTokenizer, "train", no_training)
    reused = data.make_tokenizer("sentencepiece", files, vocab_size=400, model_dir=tmp_path / "tok")
    assert reused.sha256 == tok.sha256


# --- files and splits ----------------------------------------------------------------


def test_split_by_files_never_shares_a_file(corpus):
    files = data.resolve_files(corpus)
    assert len(files) == 10 and files == sorted(files)
    train, val = data.split_files(files, val_fraction=0.2, seed=0)
    assert len(val) == 2 and not set(train) & set(val) and set(train) | set(val) == set(files)
    assert data.split_files(list(reversed(files)), val_fraction=0.2, seed=0).val == tuple(sorted(val, reverse=True))
    others = {data.split_files(files, val_fraction=0.2, seed=s).val for s in range(1, 6)}
    assert any(set(v) != set(val) for v in others)
    assert len(data.split_files(files, val_fraction=0.01).val) == 1  # at least one file


def test_named_val_files_and_errors(corpus, tmp_path):
    files = data.resolve_files(str(corpus / "doc_*.txt"))
    split = data.split_files(files, val_files=["doc_01.txt", "doc_0[89].txt"])
    assert [p.name for p in split.val] == ["doc_01.txt", "doc_08.txt", "doc_09.txt"]
    assert len(split.train) == 7 and "doc_01.txt" in split.note
    with pytest.raises(data.DataError, match="nope.txt"):
        data.split_files(files, val_files=["nope.txt"])
    with pytest.raises(data.DataError, match="nothing is left"):
        data.split_files(files, val_files=["*.txt"])
    with pytest.raises(data.DataError, match="missing_dir"):
        data.resolve_files(tmp_path / "missing_dir")
    with pytest.raises(data.DataError, match=r"\*.md"):
        data.resolve_files(str(corpus / "*.md"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="no \\*.txt"):
        data.resolve_files(tmp_path / "empty")


def test_single_file_holds_out_its_tail(tmp_path):
    path = tmp_path / "one.txt"
    text = "".join(f"line {i} of the only file\n" for i in range(500))
    path.write_text(text)
    split = data.split_files(data.resolve_files(path), val_fraction=0.05)
    assert split.tail_fraction == 0.05 and "single file" in split.note
    (head,), (tail,) = data.read_documents(split, "train"), data.read_documents(split, "val")
    assert head + tail == text and head.endswith("\n")
    assert abs(len(tail) / len(text) - 0.05) < 0.01


# --- LM batches and resumable iteration ----------------------------------------------


def test_lm_batches_shift_and_dtypes(corpus, tmp_path):
    lm = _text_data(corpus, tmp_path)
    assert lm.tokens_per_batch == 8 * 32 and lm.num_train_windows == (len(lm.train_tokens) - 1) // 32
    batch = next(lm.train_iterator())
    assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
        "inputs": (np.int32, (8, 32)),
        "targets": (np.int32, (8, 32)),
        "weights": (np.float32, (8, 32)),
    }
    assert np.array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert (batch["weights"] == 1).all()
    # Every target is the token after its input in the training stream.
    for row_in, row_tgt in zip(batch["inputs"], batch["targets"]):
        start = next(
            s for s in range(0, len(lm.train_tokens), 32) if np.array_equal(lm.train_tokens[s : s + 32], row_in)
        )
        assert np.array_equal(lm.train_tokens[start + 1 : start + 33], row_tgt)


def test_iterator_resume_is_exact(corpus, tmp_path):
    lm = _text_data(corpus, tmp_path)
    it = lm.train_iterator()
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(3)]
    fresh = _text_data(corpus, tmp_path).train_iterator()
    fresh.set_state(state)
    assert fresh.step == 5
    for want, got in zip(expected, [next(fresh) for _ in range(3)]):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])
    other_seed = _text_data(corpus, tmp_path, seed=1).train_iterator()
    with pytest.raises(data.DataError, match="seed"):
        other_seed.set_state(state)


def test_state_from_another_corpus_is_refused(corpus, tmp_path):
    state = _text_data(corpus, tmp_path).train_iterator().get_state()
    other = _write_corpus(tmp_path / "other", seed=1)
    with pytest.raises(data.DataError, match="train_digest"):
        _text_data(other, tmp_path).train_iterator().set_state(state)


def test_single_file_sentencepiece_never_sees_the_validation_tail(tmp_path):
    path = _write_corpus(tmp_path / "one", n_files=1, words_per_file=2000) / "doc_00.txt"
    lm = data.make_text_data(
        path,
        tokenizer="sentencepiece",
        vocab_size=300,
        seq_len=16,
        global_batch_size=2,
        cache_dir=tmp_path / "cache",
        log=lambda _: None,
    )
    (head_file,) = (tmp_path / "cache" / "tokenizers" / "heads").iterdir()
    (head,) = data.read_documents(data.split_files([path]), "train")
    assert head_file.read_text() == head and len(head) < len(path.read_text())
    assert lm.tokenizer.decode(lm.val_tokens) == path.read_text()[len(head) :]


def test_deterministic_and_epochs_reshuffled(corpus, tmp_path):
    a, b = _text_data(corpus, tmp_path).train_iterator(), _text_data(corpus, tmp_path).train_iterator()
    for _ in range(4):
        np.testing.assert_array_equal(next(a)["inputs"], next(b)["inputs"])
    c = _text_data(corpus, tmp_path, seed=7).train_iterator()
    assert not np.array_equal(next(c)["inputs"], next(_text_data(corpus, tmp_path).train_iterator())["inputs"])
    lm = _text_data(corpus, tmp_path)
    n = lm.num_train_windows
    epoch0, epoch1 = [lm._order[i] for i in range(n)], [lm._order[i] for i in range(n, 2 * n)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n)) and epoch0 != epoch1


def test_process_slices_partition_the_global_batch(corpus, tmp_path):
    whole = next(_text_data(corpus, tmp_path).train_iterator())
    parts = [next(_text_data(corpus, tmp_path, process_index=p, process_count=4).train_iterator()) for p in range(4)]
    for key in whole:
        assert all(part[key].shape[0] == 2 for part in parts)
        np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), whole[key])
    with pytest.raises(data.DataError, match="divisible"):
        _text_data(corpus, tmp_path, process_count=3)


def test_token_cache_is_reused(corpus, tmp_path, monkeypatch):
    first = _text_data(corpus, tmp_path)
    monkeypatch.setattr(pipeline, "tokenize_documents", lambda *a, **k: pytest.fail("tokenized again"))
    second = _text_data(corpus, tmp_path)
    np.testing.assert_array_equal(first.train_tokens, second.train_tokens)
    (corpus / "doc_00.txt").write_text("changed text\n")
    with pytest.raises(pytest.fail.Exception):
        _text_data(corpus, tmp_path)  # a changed file invalidates the cache


def test_val_covers_stream_once_and_bits_per_byte_is_exact(corpus, tmp_path):
    lm = _text_data(corpus, tmp_path, global_batch_size=4)
    batches = list(lm.val_batches())
    assert len(batches) == lm.num_val_batches
    targets = np.concatenate([b["targets"][b["weights"] > 0] for b in batches])
    np.testing.assert_array_equal(targets, lm.val_tokens[1:])
    assert batches[-1]["weights"][-1].sum() == 0 or lm.num_val_windows % 4 == 0
    val_text = (corpus / "doc_03.txt").read_text()
    assert lm.val_num_bytes() == len(val_text.encode("utf-8")) - 1  # the first byte is never a target
    assert lm.val_num_bytes(max_batches=1) == lm.tokenizer.num_bytes(batches[0]["targets"][batches[0]["weights"] > 0])
    assert len(list(lm.val_batches(max_batches=2))) == 2


def test_errors_for_too_little_text(tmp_path):
    tok = data.ByteTokenizer()
    with pytest.raises(data.DataError, match="fewer than one window"):
        data.LMData(tok.encode("short"), tok.encode("val text"), seq_len=32, global_batch_size=2)
    with pytest.raises(data.DataError, match="kind"):
        data.LMData(tok.encode("x" * 100), tok.encode("val"), seq_len=8, global_batch_size=2, kind="seq2seq")


# --- MLM ------------------------------------------------------------------------------


def _mlm_data(seed=0, **kw):
    rng = np.random.default_rng(123)
    tok = data.ByteTokenizer()
    stream = rng.integers(tok.num_special, tok.vocab_size, 40_000).astype(np.int32)
    stream[rng.choice(len(stream), 400, replace=False)] = tok.eos_id  # document boundaries
    args = dict(seq_len=64, global_batch_size=16, seed=seed, kind="mlm", tokenizer=tok)
    args.update(kw)
    return data.LMData(stream, stream[:1000].copy(), **args)


def test_mlm_masking_rates_and_specials():
    mlm = _mlm_data()
    it = mlm.train_iterator()
    batches = [next(it) for _ in range(40)]
    inputs, targets, weights, real = (np.concatenate([b[k] for b in batches]) for k in mlm_keys())
    tok = mlm.tokenizer
    assert inputs.dtype == targets.dtype == np.int32 and weights.dtype == np.float32 and real.dtype == bool
    assert (targets[:, 0] == tok.cls_id).all() and (targets[:, -1] == tok.sep_id).all() and real.all()
    special = np.isin(targets, tok.special_ids)
    selected = weights > 0
    assert not (selected & special).any()
    assert np.array_equal(inputs[special], targets[special])
    rate = selected.sum() / (~special).sum()
    assert abs(rate - 0.15) < 0.01
    masked = (inputs[selected] == tok.mask_id).mean()
    kept = (inputs[selected] == targets[selected]).mean()
    randomised = 1 - masked - kept
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.02 and abs(randomised - 0.1) < 0.02
    assert (inputs[~selected] == targets[~selected]).all()


def mlm_keys():
    return ("inputs", "targets", "weights", "padding_mask")


def test_mlm_is_reproducible_and_resumable():
    a, b = _mlm_data().train_iterator(), _mlm_data().train_iterator()
    for _ in range(3):
        x, y = next(a), next(b)
        for key in mlm_keys():
            np.testing.assert_array_equal(x[key], y[key])
    state = a.get_state()
    want = next(a)
    c = _mlm_data().train_iterator()
    c.set_state(json.loads(json.dumps(state)))
    got = next(c)
    for key in mlm_keys():
        np.testing.assert_array_equal(want[key], got[key])
    assert not np.array_equal(
        next(_mlm_data(seed=5).train_iterator())["weights"], next(_mlm_data().train_iterator())["weights"]
    )


def test_mlm_val_pads_last_window_and_batch():
    mlm = _mlm_data(global_batch_size=8)
    batches = list(mlm.val_batches())
    assert mlm.num_val_windows == math.ceil(1000 / 62) and len(batches) == math.ceil(mlm.num_val_windows / 8)
    last = batches[-1]
    lengths = last["padding_mask"].sum(axis=1)
    n_real_rows = mlm.num_val_windows - 8 * (len(batches) - 1)
    assert lengths[n_real_rows - 1] == 1000 - 62 * (mlm.num_val_windows - 1) + 2
    assert (lengths[n_real_rows:] == 2).all() and (last["weights"][n_real_rows:] == 0).all()
    assert (last["inputs"][n_real_rows:, 0] == mlm.tokenizer.cls_id).all()
    again = list(_mlm_data(global_batch_size=8).val_batches())
    np.testing.assert_array_equal(batches[0]["inputs"], again[0]["inputs"])
    assert mlm.val_num_bytes() == sum(int(b["weights"].sum()) for b in batches)  # bytes: one per selected id
