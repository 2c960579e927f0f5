"""Tokenizers behind one interface: bytes by default, SentencePiece trained locally.

Both keep special ids at the bottom of the vocabulary and can say exactly how many UTF-8
bytes any id sequence stands for (``num_bytes``), so validation loss converts to bits per
byte, a number comparable across tokenizers. For that to be exact the SentencePiece model
is trained with identity normalization, no dummy prefix, no whitespace collapsing and
byte fallback: ``decode(encode(t)) == t`` for every string, and the byte lengths of the
pieces add up to the byte length of the text.

Example:
    >>> tok = make_tokenizer("byte")
    >>> tok.decode(tok.encode("héllo"))
    'héllo'
"""

from __future__ import annotations

import abc
import base64
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nasjax.data.errors import DataError

__all__ = ["ByteTokenizer", "SentencePieceTokenizer", "Tokenizer", "make_tokenizer", "tokenizer_from_config"]

# Long texts go through SentencePiece's batched, multi-threaded encoder as line-aligned
# chunks instead of as one string on one thread.
_CHUNK_CHARS = 1 << 16


class Tokenizer(abc.ABC):
    """Common interface. Special ids occupy ``[0, num_special)``; ordinary ids follow.

    Attributes:
        vocab_size: number of ids.
        pad_id, eos_id, mask_id, cls_id, sep_id, unk_id: special ids.
        byte_lengths: int32 [vocab_size], UTF-8 bytes each id stands for (0 for specials).
    """

    vocab_size: int
    pad_id: int
    eos_id: int
    mask_id: int
    cls_id: int
    sep_id: int
    unk_id: int
    num_special: int
    byte_lengths: np.ndarray

    @abc.abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """Returns the int32 ids of ``text`` (no eos/cls added)."""

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encodes several texts; subclasses may do this in parallel."""
        return [self.encode(t) for t in texts]

    @abc.abstractmethod
    def decode(self, ids) -> str:
        """Returns the text of ``ids``; special ids are dropped."""

    @abc.abstractmethod
    def to_config(self, embed: bool = False) -> dict:
        """A JSON-serialisable dict that ``tokenizer_from_config`` turns back into this tokenizer."""

    def num_bytes(self, ids) -> int:
        """UTF-8 bytes that ``ids`` stand for (specials count 0); exact for bits per byte."""
        return int(self.byte_lengths[np.asarray(ids, dtype=np.int64)].sum())

    @property
    def special_ids(self) -> tuple[int, ...]:
        return tuple(range(self.num_special))

    def fingerprint(self) -> str:
        """A short hash that changes whenever the id mapping changes (keys token caches)."""
        return hashlib.sha256(json.dumps(self.to_config(), sort_keys=True).encode()).hexdigest()[:16]


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: specials pad=0, eos=1, mask=2, cls=3, sep=4, unk=5, byte b -> b + 6."""

    pad_id, eos_id, mask_id, cls_id, sep_id, unk_id = 0, 1, 2, 3, 4, 5
    num_special = 6
    vocab_size = 256 + 6

    def __init__(self):
        self.byte_lengths = np.concatenate([np.zeros(6, np.int32), np.ones(256, np.int32)])

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + self.num_special

    def decode(self, ids) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        ids = ids[(ids >= self.num_special) & (ids < self.vocab_size)]
        return (ids - self.num_special).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def to_config(self, embed: bool = False) -> dict:
        return {"kind": "byte", "vocab_size": self.vocab_size}


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model with pad=0, eos=1, unk=2, bos=3, [MASK]=4, [CLS]=5, [SEP]=6.

    [MASK], [CLS] and [SEP] are control symbols: reserved ids that text never encodes to,
    so a literal "[MASK]" in a corpus stays text rather than becoming the mask token.
    """

    pad_id, eos_id, unk_id, bos_id, mask_id, cls_id, sep_id = 0, 1, 2, 3, 4, 5, 6
    num_special = 7

    def __init__(self, model_path: str | os.PathLike | None = None, model_proto: bytes | None = None):
        import sentencepiece as spm

        if (model_path is None) == (model_proto is None):
            raise ValueError("give exactly one of model_path and model_proto")
        if model_proto is None:
            try:
                model_proto = Path(model_path).read_bytes()
            except OSError as e:
                raise DataError(f"cannot read SentencePiece model {model_path}: {e}") from e
        self.model_path = None if model_path is None else str(Path(model_path).resolve())
        self.model_proto = model_proto
        self.sha256 = hashlib.sha256(model_proto).hexdigest()
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self._sp.get_piece_size()
        got = [self._sp.id_to_piece(i) for i in range(self.num_special)]
        if got != ["<pad>", "</s>", "<unk>", "<s>", "[MASK]", "[CLS]", "[SEP]"]:
            raise DataError(f"SentencePiece model {model_path} was not trained by nasjax (first pieces {got})")
        self.byte_lengths = np.array([self._piece_bytes(i) for i in range(self.vocab_size)], np.int32)

    @classmethod
    def train(
        cls,
        files: Sequence[str | os.PathLike],
        vocab_size: int,
        model_path: str | os.PathLike,
        seed: int = 0,
        model_type: str = "unigram",
        max_sentences: int = 2_000_000,
    ) -> SentencePieceTokenizer:
        """Trains a model on text files and writes it to ``model_path`` atomically.

        Args:
            files: training text files (train split only, so validation stays unseen).
            vocab_size: target size; a soft limit, so tiny corpora yield a smaller vocabulary.
            model_path: where to write the ``.model`` file.
            seed: seeds SentencePiece's sentence sampling.
            model_type: ``"unigram"`` or ``"bpe"``.
            max_sentences: lines sampled from the corpus for training.

        Returns:
            The trained tokenizer.
        """
        import sentencepiece as spm

        if vocab_size <= 256 + cls.num_special:
            raise DataError(f"SentencePiece vocab_size must exceed {256 + cls.num_special} (byte fallback needs 256)")
        model_path = Path(model_path)
        model_path.parent.mkdir(parents=True, exist_ok=True)
        spm.set_random_generator_seed(seed)
        with tempfile.TemporaryDirectory(dir=model_path.parent) as tmp:
            prefix = os.path.join(tmp, "spm")
            spm.SentencePieceTrainer.train(
                input=[str(f) for f in files],
                model_prefix=prefix,
                vocab_size=vocab_size,
                model_type=model_type,
                byte_fallback=True,
                character_coverage=0.9995,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                allow_whitespace_only_pieces=True,
                pad_id=0,
                eos_id=1,
                unk_id=2,
                bos_id=3,
                control_symbols=["[MASK]", "[CLS]", "[SEP]"],
                hard_vocab_limit=False,
                input_sentence_size=max_sentences,
                shuffle_input_sentence=True,
                num_threads=os.cpu_count() or 1,
                minloglevel=2,
            )
            os.replace(prefix + ".model", model_path)
        return cls(model_path)

    def _piece_bytes(self, i: int) -> int:
        if self._sp.is_control(i) or self._sp.is_unknown(i):
            return 0
        if self._sp.is_byte(i):
            return 1
        return len(self._sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))

    def encode(self, text: str) -> np.ndarray:
        if len(text) <= _CHUNK_CHARS:
            return np.asarray(self._sp.encode(text), dtype=np.int32)
        return np.concatenate(self.encode_batch(_line_chunks(text)))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int32) for ids in self._sp.encode(list(texts))]

    def decode(self, ids) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        ids = ids[(ids >= self.num_special) & (ids < self.vocab_size)]
        return self._sp.decode(ids.tolist())

    def fingerprint(self) -> str:
        # The model's content, not where it is stored, decides the ids.
        return self.sha256[:16]

    def to_config(self, embed: bool = False) -> dict:
        """Returns the config; ``embed=True`` inlines the model so the dict is self-contained."""
        config = {"kind": "sentencepiece", "vocab_size": self.vocab_size, "sha256": self.sha256}
        if self.model_path is not None:
            config["model_path"] = self.model_path
        if embed or self.model_path is None:
            config["model_b64"] = base64.b64encode(self.model_proto).decode("ascii")
        return config


def _line_chunks(text: str) -> list[str]:
    # Pieces never contain a newline (the trainer sees one line at a time), so cutting
    # right after a newline cannot change the tokenization.
    chunks, start = [], 0
    while start < len(text):
        end = min(start + _CHUNK_CHARS, len(text))
        if end < len(text):
            newline = text.rfind("\n", start, end)
            end = newline + 1 if newline > start else end
        chunks.append(text[start:end])
        start = end
    return chunks


def tokenizer_from_config(config: dict) -> Tokenizer:
    """Rebuilds a tokenizer from ``Tokenizer.to_config()``.

    Raises:
        DataError: if the SentencePiece model file is missing or differs from the one the
            config was written with (its sha256 changed).
    """
    kind = config.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "sentencepiece":
        if "model_b64" in config:
            tok = SentencePieceTokenizer(model_proto=base64.b64decode(config["model_b64"]))
        else:
            tok = SentencePieceTokenizer(config["model_path"])
        if config.get("sha256") and tok.sha256 != config["sha256"]:
            raise DataError(f"SentencePiece model {config.get('model_path')} changed since this config was written")
        return tok
    raise DataError(f"unknown tokenizer kind {kind!r}; expected 'byte' or 'sentencepiece'")


def make_tokenizer(
    kind: str = "byte",
    files: Sequence[str | os.PathLike] = (),
    vocab_size: int | None = None,
    model_dir: str | os.PathLike | None = None,
    model_path: str | os.PathLike | None = None,
    seed: int = 0,
    log=print,
) -> Tokenizer:
    """Returns a tokenizer, training a SentencePiece model only when none fits yet.

    Args:
        kind: ``"byte"`` or ``"sentencepiece"``.
        files: training files for SentencePiece (pass the train split only).
        vocab_size: SentencePiece vocabulary size.
        model_dir: where trained models are kept; a model is reused when one trained on
            the same files (names, sizes, mtimes), vocab_size and seed is already there.
            Defaults to ``<cache>/tokenizers``.
        model_path: an existing ``.model`` file to load instead of training.
        seed: SentencePiece training seed.
        log: called with one-line progress messages.
    """
    if kind == "byte":
        return ByteTokenizer()
    if kind != "sentencepiece":
        raise DataError(f"unknown tokenizer kind {kind!r}; expected 'byte' or 'sentencepiece'")
    if model_path is not None:
        return SentencePieceTokenizer(model_path)
    if not files or not vocab_size:
        raise DataError("training a SentencePiece tokenizer needs files and vocab_size (or give model_path)")
    if model_dir is None:
        from nasjax.data.fetch import default_cache_dir

        model_dir = default_cache_dir() / "tokenizers"
    stats = [[Path(f).name, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]
    key = hashlib.sha256(json.dumps([vocab_size, seed, stats]).encode()).hexdigest()[:12]
    path = Path(model_dir) / f"spm_v{vocab_size}_{key}.model"
    if path.exists():
        return SentencePieceTokenizer(path)
    log(f"training a SentencePiece tokenizer (vocab {vocab_size}) on {len(files)} files -> {path}")
    return SentencePieceTokenizer.train(files, vocab_size, path, seed=seed)
