"""Language-model data: token streams, fixed-length windows, LM and MLM batches on grain.

Each split is tokenized once into one int32 stream (documents joined by eos, each
document followed by one) and cached as ``.npy`` under ``<cache>/tokens/``, keyed by the
tokenizer and the files' names, sizes and mtimes, so reruns and other hosts memory-map it
instead of tokenizing again.

Training cuts the stream into non-overlapping windows, shuffles window ids with grain
(re-shuffled each epoch, deterministically from the seed) and serves global batch ``s``
as grain element ``s``; each process builds only its own rows (``iterators.host_rows``).
Validation covers the whole stream in order, every target token exactly once, so
``sum(loss_nats) / (ln 2 * val_num_bytes())`` is the exact bits per byte.

Batch dicts (numpy, ``b = global_batch_size // process_count``, ``L = seq_len``):

* ``kind="lm"``: ``inputs`` int32 [b, L]; ``targets`` int32 [b, L] (the next token of
  every input); ``weights`` float32 [b, L] (1 real target, 0 padding).
* ``kind="mlm"``: ``inputs`` int32 [b, L] = ``[CLS] tokens [SEP]`` with BERT masking;
  ``targets`` int32 [b, L] (original ids); ``weights`` float32 [b, L] (1 at the ~15%
  selected positions); ``padding_mask`` bool [b, L] (True at real tokens, incl. CLS/SEP).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import grain
import numpy as np

from nasjax.data import text as text_lib
from nasjax.data.errors import DataError
from nasjax.data.iterators import BatchIterator, check_sharding, host_rows, make_step_dataset
from nasjax.data.tokenizers import ByteTokenizer, Tokenizer, make_tokenizer

__all__ = ["LMData", "cached_token_stream", "make_text_data", "mask_tokens", "tokenize_documents"]

Batch = dict[str, np.ndarray]
_DOCS_PER_ENCODE = 256
_MLM_TRAIN_TAG, _MLM_VAL_TAG = 0x4D4C4D, 0x56414C  # keep train and val masking streams apart


def tokenize_documents(documents: Iterable[str], tokenizer: Tokenizer, out_path: str | os.PathLike) -> int:
    """Tokenizes documents into one ``.npy`` int32 stream, each followed by eos.

    Streams through a temporary raw file, so corpora larger than memory are fine. The
    ``.npy`` appears atomically (rename), so a crash never leaves a truncated cache entry.

    Returns:
        The number of tokens written.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    eos = np.array([tokenizer.eos_id], np.int32)
    total = 0
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        raw_path = os.path.join(tmp, "tokens.bin")
        with open(raw_path, "wb") as raw:
            batch: list[str] = []
            for doc in itertools.chain(documents, [None]):
                if doc is not None:
                    batch.append(doc)
                if batch and (doc is None or len(batch) >= _DOCS_PER_ENCODE):
                    for ids in tokenizer.encode_batch(batch):
                        raw.write(ids.astype(np.int32).tobytes())
                        raw.write(eos.tobytes())
                        total += len(ids) + 1
                    batch = []
        npy = np.lib.format.open_memmap(os.path.join(tmp, "tokens.npy"), mode="w+", dtype=np.int32, shape=(total,))
        if total:
            npy[:] = np.fromfile(raw_path, dtype=np.int32)
        npy.flush()
        del npy
        os.replace(os.path.join(tmp, "tokens.npy"), out_path)
    return total


def cached_token_stream(
    key: dict,
    documents: Callable[[], Iterable[str]],
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike | None = None,
    log: Callable[[str], object] = print,
) -> np.ndarray:
    """Returns the token stream for ``documents()``, tokenizing only on a cache miss.

    Args:
        key: JSON-able facts that identify the documents (file stats, dataset name and
            split); the tokenizer's fingerprint is added.
        documents: called only on a miss; yields the documents' text.
        tokenizer: the tokenizer.
        cache_dir: cache root (``<cache>/tokens/<hash>.npy``); defaults to
            ``fetch.default_cache_dir()``.
        log: called with one-line progress messages.

    Returns:
        A read-only memory-mapped int32 array.
    """
    if cache_dir is None:
        from nasjax.data.fetch import default_cache_dir

        cache_dir = default_cache_dir()
    full_key = json.dumps({"tokenizer": tokenizer.fingerprint(), **key}, sort_keys=True, default=str)
    digest = hashlib.sha256(full_key.encode()).hexdigest()[:20]
    path = Path(cache_dir) / "tokens" / f"{digest}.npy"
    if not path.exists():
        n = tokenize_documents(documents(), tokenizer, path)
        log(f"tokenized {key.get('name', 'documents')}: {n:,} tokens -> {path}")
    return np.load(path, mmap_mode="r")


def mask_tokens(
    tokens: np.ndarray,
    real: np.ndarray,
    rngs: Sequence[np.random.Generator],
    tokenizer: Tokenizer,
    rate: float = 0.15,
) -> Batch:
    """BERT masking: select ``rate`` of real non-special positions; 80% [MASK], 10% random, 10% kept.

    At least one position per row is selected when any is eligible, so no training row
    carries zero weight.

    Args:
        tokens: int32 [b, L] original ids.
        real: bool [b, L], True at real (non-padding) positions.
        rngs: one generator per row; the caller derives each from stable indices.
        tokenizer: provides mask_id, special ids and the range of ordinary ids.
        rate: selection probability.

    Returns:
        ``inputs``, ``targets`` (= tokens), ``weights`` (float32, 1 at selected positions).
    """
    b, length = tokens.shape
    if b == 0:
        return {
            "inputs": tokens.astype(np.int32),
            "targets": tokens.astype(np.int32),
            "weights": np.zeros((0, length), np.float32),
        }
    eligible = real & (tokens >= tokenizer.num_special)
    draws = np.stack([rng.random((2, length)) for rng in rngs]) if b else np.zeros((0, 2, length))
    random_ids = np.stack([rng.integers(tokenizer.num_special, tokenizer.vocab_size, length) for rng in rngs])
    select_u, action_u = draws[:, 0], draws[:, 1]
    selected = eligible & (select_u < rate)
    empty = ~selected.any(axis=1) & eligible.any(axis=1)
    if empty.any():
        first = np.argmin(np.where(eligible, select_u, np.inf), axis=1)
        selected[np.flatnonzero(empty), first[empty]] = True
    inputs = np.where(selected & (action_u < 0.8), tokenizer.mask_id, tokens)
    inputs = np.where(selected & (action_u >= 0.8) & (action_u < 0.9), random_ids, inputs)
    return {
        "inputs": inputs.astype(np.int32),
        "targets": tokens.astype(np.int32),
        "weights": selected.astype(np.float32),
    }


class LMData:
    """Training and validation batches over two token streams.

    Args:
        train_tokens: int32 [N] training stream (documents separated by eos).
        val_tokens: int32 [M] validation stream.
        seq_len: L, tokens per row (for MLM including [CLS] and [SEP]).
        global_batch_size: rows per global batch, across all processes.
        seed: shuffling (and MLM masking) seed.
        process_index: this process (``jax.process_index()``).
        process_count: number of processes (``jax.process_count()``).
        kind: ``"lm"`` (next-token) or ``"mlm"`` (masked LM for encoders).
        tokenizer: the tokenizer the streams were made with (ByteTokenizer by default).
        mask_rate: MLM selection rate.
        note: a sentence about the split, for the run log.
        read_options: grain prefetch settings.
    """

    def __init__(
        self,
        train_tokens: np.ndarray,
        val_tokens: np.ndarray,
        seq_len: int,
        global_batch_size: int,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        kind: str = "lm",
        tokenizer: Tokenizer | None = None,
        mask_rate: float = 0.15,
        note: str = "",
        read_options: grain.ReadOptions | None = None,
    ):
        if kind not in ("lm", "mlm"):
            raise DataError(f"data kind must be 'lm' or 'mlm', got {kind!r}")
        if seq_len < (3 if kind == "mlm" else 1):
            raise DataError(f"seq_len {seq_len} is too short for kind {kind!r}")
        self.local_batch_size = check_sharding(global_batch_size, process_index, process_count)
        self.train_tokens, self.val_tokens = train_tokens, val_tokens
        self.seq_len, self.global_batch_size, self.seed, self.kind = seq_len, global_batch_size, seed, kind
        self.process_index, self.process_count = process_index, process_count
        self.tokenizer = tokenizer or ByteTokenizer()
        self.mask_rate, self.note, self.read_options = mask_rate, note, read_options
        # An LM window holds L inputs plus the one extra token the last input predicts;
        # an MLM window holds the L - 2 tokens between [CLS] and [SEP].
        self._stride = seq_len if kind == "lm" else seq_len - 2
        self._span = seq_len + 1 if kind == "lm" else seq_len - 2
        n_train = len(train_tokens)
        self.num_train_windows = (n_train - self._span) // self._stride + 1 if n_train >= self._span else 0
        if self.num_train_windows == 0:
            raise DataError(f"training text has {n_train} tokens, fewer than one window of {self._span}")
        if len(val_tokens) < 2:
            raise DataError(f"validation text has {len(val_tokens)} tokens; it needs at least 2")
        self._order = grain.MapDataset.range(self.num_train_windows).shuffle(seed=seed).repeat(None)
        # Cheap identity of the training text (length and both ends), so a state saved on
        # another corpus of the same size is still refused.
        ends = np.concatenate([train_tokens[:4096], train_tokens[-4096:]]).astype(np.int32)
        self._train_digest = hashlib.sha256(ends.tobytes() + str(n_train).encode()).hexdigest()[:12]

    @property
    def tokens_per_batch(self) -> int:
        """Token positions in one global batch (``global_batch_size * seq_len``)."""
        return self.global_batch_size * self.seq_len

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def num_val_windows(self) -> int:
        targets = len(self.val_tokens) - 1 if self.kind == "lm" else len(self.val_tokens)
        return math.ceil(targets / self._stride)

    @property
    def num_val_batches(self) -> int:
        return math.ceil(self.num_val_windows / self.global_batch_size)

    def description(self) -> dict:
        """What identifies the training stream; stored in and checked against iterator states."""
        return {
            "kind": self.kind,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "num_train_windows": self.num_train_windows,
            "tokenizer": self.tokenizer.fingerprint(),
            "train_digest": self._train_digest,
        }

    def train_iterator(self) -> BatchIterator:
        """An endless iterator of this process's training batches, with get_state/set_state."""
        return BatchIterator(make_step_dataset(self._train_batch), self.description(), self.read_options)

    def _train_batch(self, step: int) -> Batch:
        positions = host_rows(step, self.global_batch_size, self.process_index, self.process_count)
        windows = np.array([self._order[int(k)] for k in positions], np.int64)
        rows = self.train_tokens[windows[:, None] * self._stride + np.arange(self._span)]
        rows = np.asarray(rows, np.int32)
        if self.kind == "lm":
            return {
                "inputs": rows[:, :-1],
                "targets": rows[:, 1:],
                "weights": np.ones(rows[:, 1:].shape, np.float32),
            }
        epochs = positions // self.num_train_windows
        rngs = [np.random.default_rng([self.seed, _MLM_TRAIN_TAG, int(e), int(k)]) for e, k in zip(epochs, positions)]
        return self._mlm_batch(rows, np.full(len(rows), rows.shape[1]), rngs)

    def _mlm_batch(self, bodies: np.ndarray, lengths: np.ndarray, rngs) -> Batch:
        tok = self.tokenizer
        b = len(bodies)
        seq = np.full((b, self.seq_len), tok.pad_id, np.int32)
        seq[:, 0] = tok.cls_id
        cols = np.arange(self.seq_len - 2)
        seq[:, 1:-1] = np.where(cols < lengths[:, None], bodies, tok.pad_id)
        seq[np.arange(b), lengths + 1] = tok.sep_id
        real = np.arange(self.seq_len) < (lengths + 2)[:, None]
        batch = mask_tokens(seq, real, rngs, tok, self.mask_rate)
        batch["padding_mask"] = real
        return batch

    def val_batches(self, max_batches: int | None = None) -> Iterator[Batch]:
        """This process's slices of the validation batches, in order, deterministically.

        The last window and the last batch are padded (weights 0; padding rows hold an
        empty ``[CLS] [SEP]`` sequence for MLM so no attention row is fully masked).

        Args:
            max_batches: stop after this many global batches (None: the whole stream).
        """
        n = self.num_val_batches if max_batches is None else min(max_batches, self.num_val_batches)
        for step in range(n):
            yield self._val_batch(host_rows(step, self.global_batch_size, self.process_index, self.process_count))

    def _val_batch(self, positions: np.ndarray) -> Batch:
        tok, length, stream = self.tokenizer, self.seq_len, self.val_tokens
        starts = positions * self._stride
        if self.kind == "lm":
            inputs = np.full((len(positions), length), tok.pad_id, np.int32)
            targets = np.full((len(positions), length), tok.pad_id, np.int32)
            weights = np.zeros((len(positions), length), np.float32)
            for row, start in enumerate(starts):
                n = int(np.clip(len(stream) - 1 - start, 0, length))
                inputs[row, :n] = stream[start : start + n]
                targets[row, :n] = stream[start + 1 : start + 1 + n]
                weights[row, :n] = 1.0
            return {"inputs": inputs, "targets": targets, "weights": weights}
        bodies = np.full((len(positions), self._span), tok.pad_id, np.int32)
        lengths = np.zeros(len(positions), np.int64)
        for row, start in enumerate(starts):
            piece = stream[start : start + self._span]
            bodies[row, : len(piece)] = piece
            lengths[row] = len(piece)
        rngs = [np.random.default_rng([self.seed, _MLM_VAL_TAG, int(k)]) for k in positions]
        return self._mlm_batch(bodies, lengths, rngs)

    def val_num_bytes(self, max_batches: int | None = None) -> int:
        """UTF-8 bytes of all weighted validation targets over all processes.

        With ``sum(loss_nats)`` over the same global batches, bits per byte is
        ``sum(loss_nats) / (math.log(2) * val_num_bytes(max_batches))``.
        """
        n = self.num_val_batches if max_batches is None else min(max_batches, self.num_val_batches)
        windows = min(n * self.global_batch_size, self.num_val_windows)
        if self.kind == "lm":
            last = min(windows * self._stride + 1, len(self.val_tokens))
            return self.tokenizer.num_bytes(self.val_tokens[1:last])
        total = 0
        for first in range(0, windows, self.global_batch_size):
            batch = self._val_batch(np.arange(first, min(first + self.global_batch_size, windows)))
            total += int((self.tokenizer.byte_lengths[batch["targets"]] * batch["weights"]).sum())
        return total


def make_text_data(
    path,
    val_files: Sequence[str] | str = (),
    val_fraction: float = 0.05,
    tokenizer: Tokenizer | str = "byte",
    seq_len: int = 128,
    global_batch_size: int = 32,
    seed: int = 0,
    kind: str = "lm",
    cache_dir: str | os.PathLike | None = None,
    process_index: int = 0,
    process_count: int = 1,
    vocab_size: int | None = None,
    log: Callable[[str], object] = print,
) -> LMData:
    """Builds ``LMData`` from local text files: resolve, split by files, tokenize (cached).

    Args:
        path: a file, folder of ``*.txt``, glob, or list of these (``text.resolve_files``).
        val_files: validation files by basename or glob; else ``val_fraction`` of the files.
        val_fraction: see ``text.split_files``.
        tokenizer: a ``Tokenizer``, or ``"byte"`` / ``"sentencepiece"`` (trained on the
            training files with ``vocab_size``, reused from ``<cache>/tokenizers``).
        seq_len, global_batch_size, seed, kind, process_index, process_count: see ``LMData``.
        cache_dir: cache root for token streams and tokenizers.
        vocab_size: SentencePiece vocabulary size.
        log: called with one-line progress messages.
    """
    if cache_dir is None:
        from nasjax.data.fetch import default_cache_dir

        cache_dir = default_cache_dir()
    split = text_lib.split_files(text_lib.resolve_files(path), val_files, val_fraction, seed)
    if isinstance(tokenizer, str):
        model_dir = Path(cache_dir) / "tokenizers"
        files = list(split.train)
        if split.tail_fraction is not None and tokenizer == "sentencepiece":
            files = [_head_file(split, model_dir)]  # the tokenizer must not see validation text either
        tokenizer = make_tokenizer(tokenizer, files, vocab_size, model_dir=model_dir, seed=seed, log=log)
    streams = {}
    for which in ("train", "val"):
        key = {
            "name": f"{which} split of {len(split.train if which == 'train' else split.val)} files",
            "split": which,
            "tail_fraction": split.tail_fraction,
            "files": _file_stats(split.train if which == "train" else split.val),
        }
        streams[which] = cached_token_stream(
            key, lambda which=which: text_lib.read_documents(split, which), tokenizer, cache_dir, log
        )
    return LMData(
        streams["train"],
        streams["val"],
        seq_len,
        global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        kind=kind,
        tokenizer=tokenizer,
        note=split.note,
    )


def _file_stats(files: Sequence[Path]) -> list:
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _head_file(split: text_lib.FileSplit, folder: Path) -> Path:
    """Writes (once) the training head of a single-file split, to train a tokenizer on."""
    digest = hashlib.sha256(json.dumps([_file_stats(split.train), split.tail_fraction]).encode()).hexdigest()[:12]
    path = folder / "heads" / f"{split.train[0].stem}_{digest}.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(text_lib.read_documents(split, "train")), encoding="utf-8")
        os.replace(tmp, path)
    return path
