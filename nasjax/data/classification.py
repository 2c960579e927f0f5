"""Labelled sentence (or sentence-pair) classification from JSON lines.

The format is one object per line: ``{"label": int, "text": str}``, with an optional
``"text_b": str`` for pair tasks (MRPC, QQP, MNLI, ...). Labels are ``0 .. n_classes-1``.
The tfds GLUE adapter writes the same format, so downstream fine-tuning has one path.

Batch dicts (numpy, ``b = global_batch_size // process_count``, ``L = seq_len``):
``inputs`` int32 [b, L] = ``[CLS] text [SEP]`` (or ``[CLS] a [SEP] b [SEP]``) truncated
and padded; ``padding_mask`` bool [b, L] (True at real tokens); ``labels`` int32 [b];
``weights`` float32 [b] (0 for the padding rows of the last validation batch).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import grain
import numpy as np

from nasjax.data.errors import DataError
from nasjax.data.iterators import BatchIterator, check_sharding, host_rows, make_step_dataset
from nasjax.data.tokenizers import ByteTokenizer, Tokenizer

__all__ = ["ClassificationData", "encode_examples", "load_jsonl", "load_task_list"]

Batch = dict[str, np.ndarray]


def load_jsonl(path: str | os.PathLike) -> list[dict]:
    """Reads ``{"label": int, "text": str[, "text_b": str]}`` lines; blank lines are skipped.

    Raises:
        DataError: naming the file and line of the first malformed line, missing key or
            non-integer label, or when the file is missing or holds no example.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"cannot read classification data {path}: {e}") from e
    examples = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from e
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object with 'label' and 'text', got {type(record).__name__}")
        for key in ("label", "text"):
            if key not in record:
                raise DataError(f"{where}: missing key {key!r}")
        label = record["label"]
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise DataError(f"{where}: label must be a non-negative int, got {label!r}")
        example = {"label": label, "text": record["text"]}
        if "text_b" in record:
            example["text_b"] = record["text_b"]
        for key in ("text", "text_b"):
            if key in example and not isinstance(example[key], str):
                raise DataError(f"{where}: {key!r} must be a string, got {type(example[key]).__name__}")
        examples.append(example)
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


def encode_examples(examples: Sequence[dict], tokenizer: Tokenizer, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Encodes examples as ``[CLS] a [SEP] (b [SEP])``, truncating the longer text first.

    Returns:
        ``ids`` int32 [n, seq_len] (padded with pad_id) and ``lengths`` int64 [n].
    """
    ids = np.full((len(examples), seq_len), tokenizer.pad_id, np.int32)
    lengths = np.zeros(len(examples), np.int64)
    texts_a = tokenizer.encode_batch([ex["text"] for ex in examples])
    pair_rows = [i for i, ex in enumerate(examples) if "text_b" in ex]
    texts_b = dict(zip(pair_rows, tokenizer.encode_batch([examples[i]["text_b"] for i in pair_rows])))
    for i, a in enumerate(texts_a):
        b = texts_b.get(i)
        budget = seq_len - (2 if b is None else 3)
        if budget < (1 if b is None else 2):
            raise DataError(f"seq_len {seq_len} leaves no room for text between the special tokens")
        if b is None:
            parts = [[tokenizer.cls_id], a[:budget], [tokenizer.sep_id]]
        else:
            # Longest-first truncation keeps both sentences of a pair represented.
            na, nb = len(a), len(b)
            while na + nb > budget:
                if na >= nb:
                    na -= 1
                else:
                    nb -= 1
            parts = [[tokenizer.cls_id], a[:na], [tokenizer.sep_id], b[:nb], [tokenizer.sep_id]]
        row = np.concatenate([np.asarray(p, np.int32) for p in parts])
        ids[i, : len(row)] = row
        lengths[i] = len(row)
    return ids, lengths


class ClassificationData:
    """Train and validation batches for sentence classification.

    Args:
        path: one JSONL file (split here, stratified by label) or ``(train_path, val_path)``.
        tokenizer: the tokenizer (ByteTokenizer by default).
        seq_len: L, tokens per row including [CLS]/[SEP].
        global_batch_size: rows per global batch across processes.
        seed: split and shuffling seed.
        val_fraction: fraction of each label held out when ``path`` is one file.
        process_index, process_count: host sharding, as in ``LMData``.
        read_options: grain prefetch settings.
    """

    def __init__(
        self,
        path: str | os.PathLike | tuple[str | os.PathLike, str | os.PathLike],
        tokenizer: Tokenizer | None = None,
        seq_len: int = 128,
        global_batch_size: int = 32,
        seed: int = 0,
        val_fraction: float = 0.1,
        process_index: int = 0,
        process_count: int = 1,
        read_options: grain.ReadOptions | None = None,
    ):
        self.local_batch_size = check_sharding(global_batch_size, process_index, process_count)
        self.tokenizer = tokenizer or ByteTokenizer()
        self.seq_len, self.global_batch_size, self.seed = seq_len, global_batch_size, seed
        self.process_index, self.process_count, self.read_options = process_index, process_count, read_options
        if isinstance(path, list | tuple):
            train_path, val_path = path
            train, val = load_jsonl(train_path), load_jsonl(val_path)
            self.note = f"train {train_path}, validation {val_path}"
        else:
            train, val = _stratified_split(load_jsonl(path), val_fraction, seed, path)
            self.note = f"{path}: {len(val)} of {len(train) + len(val)} examples held out (stratified, seed {seed})"
        self.n_classes = max(ex["label"] for ex in train + val) + 1
        self.train_ids, self.train_lengths = encode_examples(train, self.tokenizer, seq_len)
        self.val_ids, self.val_lengths = encode_examples(val, self.tokenizer, seq_len)
        self.train_labels = np.array([ex["label"] for ex in train], np.int32)
        self.val_labels = np.array([ex["label"] for ex in val], np.int32)
        self._order = grain.MapDataset.range(len(train)).shuffle(seed=seed).repeat(None)

    @property
    def num_train(self) -> int:
        return len(self.train_labels)

    @property
    def num_val(self) -> int:
        return len(self.val_labels)

    @property
    def num_val_batches(self) -> int:
        return math.ceil(self.num_val / self.global_batch_size)

    def description(self) -> dict:
        """What identifies the training stream; stored in and checked against iterator states."""
        return {
            "kind": "classification",
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "num_train": self.num_train,
            "n_classes": self.n_classes,
            "tokenizer": self.tokenizer.fingerprint(),
        }

    def train_iterator(self) -> BatchIterator:
        """An endless iterator of this process's training batches, with get_state/set_state."""
        return BatchIterator(make_step_dataset(self._train_batch), self.description(), self.read_options)

    def _train_batch(self, step: int) -> Batch:
        positions = host_rows(step, self.global_batch_size, self.process_index, self.process_count)
        rows = np.array([self._order[int(k)] for k in positions], np.int64)
        return self._gather(self.train_ids, self.train_lengths, self.train_labels, rows, np.ones(len(rows), bool))

    def val_batches(self, max_batches: int | None = None) -> Iterator[Batch]:
        """This process's slices of the validation batches, in order; the last is padded.

        Padding rows hold an empty ``[CLS] [SEP]`` example with weight 0.
        """
        n = self.num_val_batches if max_batches is None else min(max_batches, self.num_val_batches)
        for step in range(n):
            positions = host_rows(step, self.global_batch_size, self.process_index, self.process_count)
            real = positions < self.num_val
            rows = np.where(real, positions, 0)
            yield self._gather(self.val_ids, self.val_lengths, self.val_labels, rows, real)

    def _gather(self, ids, lengths, labels, rows, real) -> Batch:
        inputs = ids[rows].copy()
        lens = np.where(real, lengths[rows], 2)
        inputs[~real] = self.tokenizer.pad_id
        inputs[~real, 0] = self.tokenizer.cls_id
        inputs[~real, 1] = self.tokenizer.sep_id
        return {
            "inputs": inputs,
            "padding_mask": np.arange(self.seq_len) < lens[:, None],
            "labels": np.where(real, labels[rows], 0).astype(np.int32),
            "weights": real.astype(np.float32),
        }


def load_task_list(
    entries: str,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    val_fraction: float = 0.1,
    tfds_data_dir: str = "",
    cache_dir: str | None = None,
    what: str = "tasks",
    log=print,
) -> list[tuple[str, ClassificationData]]:
    """Comma-separated labelled tasks: ``FILE.jsonl`` (split here), ``TRAIN.jsonl|VAL.jsonl``,
    or ``glue/NAME`` (tfds, the optional ``[tfds]`` extra). Returns (name, data) pairs."""
    names = [e.strip() for e in str(entries).split(",") if e.strip()]
    if not names:
        raise DataError(f"{what} is empty: name at least one labelled JSONL file or glue/NAME task")
    out = []
    for entry in names:
        if entry.startswith("glue/"):
            from nasjax.data.tfds_source import make_glue_data

            data = make_glue_data(
                entry, tokenizer, seq_len, batch_size, seed, data_dir=tfds_data_dir or None, cache_dir=cache_dir
            )
            name = entry
        else:
            paths = [os.path.expanduser(p) for p in entry.split("|")]
            data = ClassificationData(
                paths[0] if len(paths) == 1 else tuple(paths), tokenizer, seq_len, batch_size, seed, val_fraction
            )
            name = os.path.splitext(os.path.basename(paths[0]))[0]
        log(f"task {name}: {data.num_train} train / {data.num_val} validation examples, {data.n_classes} classes")
        out.append((name, data))
    return out


def _stratified_split(examples: list[dict], val_fraction: float, seed: int, path) -> tuple[list[dict], list[dict]]:
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1) to split {path}, got {val_fraction}")
    rng = np.random.default_rng(seed)
    labels = np.array([ex["label"] for ex in examples])
    held = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        k = round(val_fraction * len(members))
        held.extend(rng.permutation(members)[:k].tolist())
    if not held or len(held) == len(examples):
        raise DataError(f"{path}: {len(examples)} examples are too few to hold out {val_fraction:.0%} per label")
    held_set = set(held)
    train = [ex for i, ex in enumerate(examples) if i not in held_set]
    val = [ex for i, ex in enumerate(examples) if i in held_set]
    return train, val
