"""TensorFlow Datasets and seqio sources (optional extras ``nasjax[tfds]``, ``nasjax[seqio]``).

On TPU VMs and GPU boxes the corpora (``lm1b``, ``c4/en``, ``tiny_shakespeare``, ``pg19``,
``glue/*``) are usually already prepared in a tfds data dir, often a GCS bucket. This
module reads them with ``download=False`` semantics (it never calls
``download_and_prepare``) and feeds the same pipeline as local text files:

* language modelling: documents are tokenized once into the token cache
  (``pipeline.cached_token_stream``) and served by ``LMData``;
* classification: ``glue/*`` splits are written as JSONL once and served by
  ``ClassificationData`` (pairs become ``text`` and ``text_b``, joined by [SEP]);
* seqio: the raw source of a registered Task (or its preprocessed features) as documents.

This is the only module that imports TensorFlow, tensorflow_datasets or seqio, and only
inside functions, so ``import nasjax`` stays fast and TF-free.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from nasjax.data.classification import ClassificationData
from nasjax.data.errors import DataError
from nasjax.data.pipeline import LMData, cached_token_stream
from nasjax.data.tokenizers import ByteTokenizer, Tokenizer, make_tokenizer

__all__ = [
    "GLUE_TEXT_KEYS",
    "make_glue_data",
    "make_seqio_lm_data",
    "make_tfds_lm_data",
    "seqio_documents",
    "tfds_classification_jsonl",
    "tfds_documents",
    "tfds_text_file",
]

# Text fields of each GLUE task in tfds; stsb is regression and has no place here.
GLUE_TEXT_KEYS = {
    "cola": ("sentence",),
    "sst2": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
    "ax": ("premise", "hypothesis"),
}
_MAX_TOKENIZER_DOCS = 200_000
Log = Callable[[str], object]


def _import_tfds():
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            "reading tfds datasets needs the nasjax[tfds] extra: pip install 'nasjax[tfds]' "
            "(tensorflow, tensorflow-datasets); or point data.path at local .txt files"
        ) from e
    try:
        # TF would otherwise claim GPU memory that JAX needs in the same process.
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass  # TF already initialised its devices; nothing more can be done here
    return tf, tfds


def _import_seqio():
    _import_tfds()
    try:
        import seqio
    except ImportError as e:
        raise ImportError("reading seqio Tasks needs the nasjax[seqio] extra: pip install 'nasjax[seqio]'") from e
    return seqio


def _as_text(value, where: str) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    raise DataError(f"{where} is not text (got {type(value).__name__}); pick another text_key")


def _prepared_builder(name: str, data_dir: str | None):
    _, tfds = _import_tfds()
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # tfds raises several unrelated types for unknown names/configs
        raise DataError(f"tfds has no dataset {name!r}: {e}") from e
    if not builder.is_prepared():
        raise DataError(
            f"tfds dataset {name!r} is not prepared in data_dir {data_dir or builder.data_dir!r}; nasjax never "
            f"downloads it. Prepare it where there is network access (`tfds build {name} --data_dir=DIR`) "
            "and pass data_dir=DIR (a gs:// bucket works on Cloud TPU)."
        )
    return builder


def tfds_documents(
    name: str,
    split: str,
    data_dir: str | None = None,
    text_key: str = "text",
    max_examples: int | None = None,
) -> Iterator[str]:
    """Yields the text of each example of a prepared tfds dataset, in stored order.

    Args:
        name: tfds name with optional config/version, e.g. ``"lm1b"``, ``"c4/en:3.1.0"``.
        split: split, slicing allowed (``"train[:1%]"``).
        data_dir: tfds data dir (``TFDS_DATA_DIR`` / ``~/tensorflow_datasets`` if None).
        text_key: the feature holding the text (``"book_text"`` for pg19).
        max_examples: stop after this many examples.

    Raises:
        DataError: if the dataset is not prepared there (nothing is downloaded).
    """
    _, tfds = _import_tfds()
    builder = _prepared_builder(name, data_dir)
    ds = builder.as_dataset(split=split, shuffle_files=False)
    if max_examples is not None:
        ds = ds.take(max_examples)
    for example in tfds.as_numpy(ds):
        if text_key not in example:
            raise DataError(f"tfds {name!r} has no feature {text_key!r}; features: {sorted(example)}")
        yield _as_text(example[text_key], f"tfds {name!r} feature {text_key!r}")


def tfds_text_file(
    name: str,
    split: str,
    out_path: str | os.PathLike,
    data_dir: str | None = None,
    text_key: str = "text",
    max_examples: int | None = _MAX_TOKENIZER_DOCS,
) -> Path:
    """Writes documents of a tfds split to one text file (e.g. to train SentencePiece on)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in tfds_documents(name, split, data_dir, text_key, max_examples):
            f.write(doc if doc.endswith("\n") else doc + "\n")
    os.replace(tmp, out_path)
    return out_path


def _lm_data(
    source: str,
    documents: Callable[[str, int | None], Iterator[str]],
    text_file: Callable[[str, Path], Path],
    tokenizer: Tokenizer | str,
    *,
    seed: int,
    train_split: str,
    val_split: str,
    cache_dir,
    max_train_examples: int | None,
    max_val_examples: int | None,
    vocab_size: int | None,
    log: Log,
    **lm_kwargs,
) -> LMData:
    if cache_dir is None:
        from nasjax.data.fetch import default_cache_dir

        cache_dir = default_cache_dir()
    cache_dir = Path(cache_dir)
    if isinstance(tokenizer, str):
        files = []
        if tokenizer == "sentencepiece":
            sample = cache_dir / "tfds_text" / f"{_slug(source)}_{_slug(train_split)}.txt"
            files = [sample if sample.exists() else text_file(train_split, sample)]
        tokenizer = make_tokenizer(tokenizer, files, vocab_size, cache_dir / "tokenizers", seed=seed, log=log)
    streams = {}
    for which, split, limit in (("train", train_split, max_train_examples), ("val", val_split, max_val_examples)):
        key = {"name": f"{source} {split}", "source": source, "split": split, "max_examples": limit}
        streams[which] = cached_token_stream(
            key, lambda split=split, limit=limit: documents(split, limit), tokenizer, cache_dir, log
        )
    note = f"{source}: train split {train_split!r}, validation split {val_split!r}"
    return LMData(streams["train"], streams["val"], seed=seed, tokenizer=tokenizer, note=note, **lm_kwargs)


def make_tfds_lm_data(
    name: str,
    tokenizer: Tokenizer | str = "byte",
    seq_len: int = 128,
    global_batch_size: int = 32,
    seed: int = 0,
    kind: str = "lm",
    train_split: str = "train",
    val_split: str = "validation",
    data_dir: str | None = None,
    text_key: str = "text",
    cache_dir: str | os.PathLike | None = None,
    max_train_examples: int | None = None,
    max_val_examples: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    vocab_size: int | None = None,
    log: Log = print,
) -> LMData:
    """``LMData`` over a prepared tfds text dataset (``lm1b``, ``c4/en``, ``tiny_shakespeare``).

    The token cache is keyed by name, split, data_dir, text_key and example limit, so the
    dataset is read through TensorFlow once; later runs memory-map the tokens.
    ``val_split`` is ``"test"`` for lm1b and tiny_shakespeare has ``"validation"``.
    Other args are as in ``pipeline.make_text_data``.
    """
    source = f"tfds:{name}@{data_dir or ''}#{text_key}"
    return _lm_data(
        source,
        lambda split, limit: tfds_documents(name, split, data_dir, text_key, limit),
        lambda split, out: tfds_text_file(name, split, out, data_dir, text_key),
        tokenizer,
        seq_len=seq_len,
        global_batch_size=global_batch_size,
        seed=seed,
        kind=kind,
        train_split=train_split,
        val_split=val_split,
        cache_dir=cache_dir,
        max_train_examples=max_train_examples,
        max_val_examples=max_val_examples,
        process_index=process_index,
        process_count=process_count,
        vocab_size=vocab_size,
        log=log,
    )


def tfds_classification_jsonl(
    name: str,
    split: str,
    out_path: str | os.PathLike,
    data_dir: str | None = None,
    text_keys: Sequence[str] | None = None,
    label_key: str = "label",
    max_examples: int | None = None,
) -> Path:
    """Writes a labelled tfds split as ``{"label", "text"[, "text_b"]}`` JSON lines.

    Args:
        name: e.g. ``"glue/sst2"``; for ``glue/*`` the text fields are known.
        split: e.g. ``"train"``, ``"validation_matched"`` (mnli).
        out_path: the JSONL file to write (atomically).
        data_dir: tfds data dir.
        text_keys: one field, or two for a pair task; defaults from ``GLUE_TEXT_KEYS``.
        label_key: the integer label field.
        max_examples: stop after this many examples.

    Returns:
        ``out_path``. Unlabelled examples (GLUE test splits use label -1) are skipped.
    """
    _, tfds = _import_tfds()
    if text_keys is None:
        task = name.split(":")[0].removeprefix("glue/")
        if not name.startswith("glue/") or task not in GLUE_TEXT_KEYS:
            raise DataError(f"give text_keys for {name!r} (known GLUE tasks: {sorted(GLUE_TEXT_KEYS)})")
        text_keys = GLUE_TEXT_KEYS[task]
    if not 1 <= len(text_keys) <= 2:
        raise DataError(f"text_keys must name one or two fields, got {list(text_keys)}")
    ds = _prepared_builder(name, data_dir).as_dataset(split=split, shuffle_files=False)
    if max_examples is not None:
        ds = ds.take(max_examples)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp, written = out_path.with_suffix(out_path.suffix + ".tmp"), 0
    with open(tmp, "w", encoding="utf-8") as f:
        for example in tfds.as_numpy(ds):
            label = example.get(label_key)
            if label is None or not float(label).is_integer():
                raise DataError(f"tfds {name!r} label {label_key!r} is not an integer class (regression task?)")
            if int(label) < 0:
                continue
            record = {"label": int(label), "text": _as_text(example[text_keys[0]], f"{name} {text_keys[0]}")}
            if len(text_keys) == 2:
                record["text_b"] = _as_text(example[text_keys[1]], f"{name} {text_keys[1]}")
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            written += 1
    if not written:
        tmp.unlink()
        raise DataError(f"tfds {name!r} split {split!r} has no labelled examples (GLUE test splits are unlabelled)")
    os.replace(tmp, out_path)
    return out_path


def make_glue_data(
    task: str,
    tokenizer: Tokenizer | None = None,
    seq_len: int = 128,
    global_batch_size: int = 32,
    seed: int = 0,
    data_dir: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    train_split: str = "train",
    val_split: str | None = None,
    text_keys: Sequence[str] | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> ClassificationData:
    """``ClassificationData`` for a tfds GLUE-style task (``"glue/sst2"`` or ``"sst2"``).

    Splits are converted to JSONL once under ``<cache>/tfds_jsonl/``. ``val_split``
    defaults to ``"validation_matched"`` for mnli and ``"validation"`` otherwise.
    """
    name = task if "/" in task else f"glue/{task}"
    if val_split is None:
        val_split = "validation_matched" if name.startswith("glue/mnli") else "validation"
    if cache_dir is None:
        from nasjax.data.fetch import default_cache_dir

        cache_dir = default_cache_dir()
    paths = []
    for split in (train_split, val_split):
        out = Path(cache_dir) / "tfds_jsonl" / f"{_slug(name)}_{_slug(data_dir or '')}_{_slug(split)}.jsonl"
        if not out.exists():
            tfds_classification_jsonl(name, split, out, data_dir, text_keys)
        paths.append(out)
    return ClassificationData(
        tuple(paths),
        tokenizer or ByteTokenizer(),
        seq_len,
        global_batch_size,
        seed,
        process_index=process_index,
        process_count=process_count,
    )


def seqio_documents(
    task_name: str,
    split: str,
    text_key: str = "text",
    preprocessed: bool = False,
    max_examples: int | None = None,
) -> Iterator[str]:
    """Yields text from a registered seqio Task or Mixture.

    Args:
        task_name: the registered name (import the module that registers it first).
        split: the split.
        text_key: feature to read.
        preprocessed: False reads the Task's raw source (before its preprocessors), which
            is what nasjax's own tokenizer wants; True runs the preprocessors and decodes
            an integer feature with the Task's vocabulary.
        max_examples: stop after this many examples.
    """
    seqio = _import_seqio()
    try:
        task = seqio.get_mixture_or_task(task_name)
    except ValueError as e:
        raise DataError(f"no seqio Task or Mixture named {task_name!r} is registered: {e}") from e
    if preprocessed:
        ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, use_cached=False, num_epochs=1)
    else:
        ds = task.source.get_dataset(split=split, shuffle=False)
    if max_examples is not None:
        ds = ds.take(max_examples)
    vocab = task.output_features[text_key].vocabulary if preprocessed and text_key in task.output_features else None
    for example in ds.as_numpy_iterator():
        if text_key not in example:
            raise DataError(f"seqio Task {task_name!r} has no feature {text_key!r}; features: {sorted(example)}")
        value = example[text_key]
        if vocab is not None and not isinstance(value, bytes | str):
            yield vocab.decode(value.tolist())
        else:
            yield _as_text(value, f"seqio Task {task_name!r} feature {text_key!r}")


def make_seqio_lm_data(
    task_name: str,
    tokenizer: Tokenizer | str = "byte",
    seq_len: int = 128,
    global_batch_size: int = 32,
    seed: int = 0,
    kind: str = "lm",
    train_split: str = "train",
    val_split: str = "validation",
    text_key: str = "text",
    preprocessed: bool = False,
    cache_dir: str | os.PathLike | None = None,
    max_train_examples: int | None = None,
    max_val_examples: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    vocab_size: int | None = None,
    log: Log = print,
) -> LMData:
    """``LMData`` over the text of a registered seqio Task (see ``seqio_documents``)."""

    def text_file(split: str, out: Path) -> Path:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            for doc in seqio_documents(task_name, split, text_key, preprocessed, _MAX_TOKENIZER_DOCS):
                f.write(doc if doc.endswith("\n") else doc + "\n")
        return out

    source = f"seqio:{task_name}#{text_key}#{'pre' if preprocessed else 'raw'}"
    return _lm_data(
        source,
        lambda split, limit: seqio_documents(task_name, split, text_key, preprocessed, limit),
        text_file,
        tokenizer,
        seq_len=seq_len,
        global_batch_size=global_batch_size,
        seed=seed,
        kind=kind,
        train_split=train_split,
        val_split=val_split,
        cache_dir=cache_dir,
        max_train_examples=max_train_examples,
        max_val_examples=max_val_examples,
        process_index=process_index,
        process_count=process_count,
        vocab_size=vocab_size,
        log=log,
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "default"
