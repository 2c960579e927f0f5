"""Tests for nasjax.data.classification: JSONL loading, splits, batches, resume."""

import json
from pathlib import Path

import numpy as np
import pytest

from nasjax import data

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "classification"


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _synthetic(tmp_path, n=50, pairs=False):
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        label = i % 3
        record = {"label": label, "text": f"example {i} " + "word " * int(rng.integers(1, 30))}
        if pairs:
            record["text_b"] = f"second sentence {i} " * int(rng.integers(1, 5))
        records.append(record)
    return _write_jsonl(tmp_path / ("pairs.jsonl" if pairs else "single.jsonl"), records)


@pytest.mark.skipif(not (SHARED / "polarity_sentences.jsonl").exists(), reason="shared data absent")
def test_real_polarity_sentences():
    ds = data.ClassificationData(SHARED / "polarity_sentences.jsonl", seq_len=64, global_batch_size=32, seed=0)
    assert ds.n_classes == 2 and ds.num_train + ds.num_val == 4000
    assert np.bincount(ds.val_labels).tolist() == [200, 200]  # stratified 10%
    batch = next(ds.train_iterator())
    assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
        "inputs": (np.int32, (32, 64)),
        "padding_mask": (np.bool_, (32, 64)),
        "labels": (np.int32, (32,)),
        "weights": (np.float32, (32,)),
    }
    tok = ds.tokenizer
    assert (batch["inputs"][:, 0] == tok.cls_id).all()
    lengths = batch["padding_mask"].sum(axis=1)
    assert (batch["inputs"][np.arange(32), lengths - 1] == tok.sep_id).all()
    assert sum(len(b["labels"]) for b in ds.val_batches()) == 32 * ds.num_val_batches


def test_synthetic_split_batches_and_padding(tmp_path):
    ds = data.ClassificationData(_synthetic(tmp_path), seq_len=24, global_batch_size=8, seed=1, val_fraction=0.2)
    assert ds.n_classes == 3 and ds.num_val == 9 and ds.num_train == 41  # round(0.2 * 17|17|16) per label
    val = list(ds.val_batches())
    assert len(val) == 2
    last = val[-1]
    assert last["weights"].tolist() == [1] + [0] * 7
    assert (last["padding_mask"][1:].sum(axis=1) == 2).all()  # padding rows are an empty [CLS] [SEP]
    np.testing.assert_array_equal(np.concatenate([b["labels"][b["weights"] > 0] for b in val]), ds.val_labels)
    # Long texts are truncated to seq_len and still end in [SEP].
    batch = next(ds.train_iterator())
    assert batch["padding_mask"].sum(axis=1).max() <= 24
    assert ds.tokenizer.decode(ds.train_ids[0]).startswith("example")


def test_pairs_and_explicit_val_file(tmp_path):
    train = _synthetic(tmp_path, pairs=True)
    val = _write_jsonl(tmp_path / "val.jsonl", [{"label": 1, "text": "a" * 40, "text_b": "b" * 5}])
    ds = data.ClassificationData((train, val), seq_len=20, global_batch_size=4)
    tok = ds.tokenizer
    row = ds.val_ids[0]
    assert ds.val_lengths[0] == 20 and (row == tok.sep_id).sum() == 2  # both texts survive truncation
    assert tok.decode(row) == "a" * 12 + "b" * 5
    assert ds.num_val == 1 and next(ds.val_batches())["weights"].tolist() == [1, 0, 0, 0]


def test_resume_and_sharding(tmp_path):
    path = _synthetic(tmp_path)
    ds = data.ClassificationData(path, seq_len=16, global_batch_size=8, seed=3)
    it = ds.train_iterator()
    for _ in range(7):  # crosses an epoch boundary (44 training rows)
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = next(it)
    again = data.ClassificationData(path, seq_len=16, global_batch_size=8, seed=3).train_iterator()
    again.set_state(state)
    got = next(again)
    for key in want:
        np.testing.assert_array_equal(want[key], got[key])
    halves = [
        next(
            data.ClassificationData(
                path, seq_len=16, global_batch_size=8, seed=3, process_index=p, process_count=2
            ).train_iterator()
        )
        for p in range(2)
    ]
    whole = next(data.ClassificationData(path, seq_len=16, global_batch_size=8, seed=3).train_iterator())
    np.testing.assert_array_equal(np.concatenate([h["labels"] for h in halves]), whole["labels"])


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"label": 1, "text": "ok"', r"bad.jsonl:3: not valid JSON"),
        ('{"text": "no label"}', r"bad.jsonl:3: missing key 'label'"),
        ('{"label": "1", "text": "x"}', r"bad.jsonl:3: label must be a non-negative int"),
        ('{"label": true, "text": "x"}', r"bad.jsonl:3: label must be"),
        ('{"label": 0, "text": 5}', r"bad.jsonl:3: 'text' must be a string"),
        ("[1, 2]", r"bad.jsonl:3: expected an object"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"label": 0, "text": "fine"}\n\n' + line + "\n")
    with pytest.raises(data.DataError, match=message):
        data.load_jsonl(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(data.DataError, match="nothere.jsonl"):
        data.load_jsonl(tmp_path / "nothere.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(data.DataError, match="no examples"):
        data.load_jsonl(tmp_path / "empty.jsonl")
