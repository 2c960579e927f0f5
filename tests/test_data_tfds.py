"""Offline tests of the tfds / seqio adapters on tiny local builders (nothing is downloaded).

Skipped unless the nasjax[tfds] extra is installed; the seqio tests also need nasjax[seqio].
"""

import json

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
tf = pytest.importorskip("tensorflow")

from nasjax.data import ByteTokenizer, DataError, tfds_source  # noqa: E402

pytestmark = pytest.mark.tfds

TRAIN_DOCS = [f"document number {i}: the quick brown fox ✓ jumps {i * 7}\nsecond line" for i in range(40)]
VAL_DOCS = [f"held out text {i} of the validation split" for i in range(6)]
PAIRS = [("a cat sat", "a cat was sitting", 1), ("it rains", "the sun shines", 0)] * 10


class NasjaxTinyText(tfds.core.GeneratorBasedBuilder):
    """A local text dataset shaped like lm1b / tiny_shakespeare."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(TRAIN_DOCS), "validation": self._generate_examples(VAL_DOCS)}

    def _generate_examples(self, docs):
        for i, doc in enumerate(docs):
            yield i, {"text": doc}


class NasjaxTinyGlue(tfds.core.GeneratorBasedBuilder):
    """A local sentence-pair task shaped like glue/mrpc, with an unlabelled test split."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="pairs")]

    def _info(self):
        features = {
            "sentence1": tfds.features.Text(),
            "sentence2": tfds.features.Text(),
            "label": tf.int64,
            "idx": tf.int32,
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(PAIRS),
            "validation": self._generate_examples(PAIRS[:3]),
            "test": self._generate_examples([(a, b, -1) for a, b, _ in PAIRS[:3]]),
        }

    def _generate_examples(self, rows):
        for i, (a, b, label) in enumerate(rows):
            yield i, {"sentence1": a, "sentence2": b, "label": label, "idx": i}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    tfds.disable_progress_bar()
    # Preparing these local builders downloads nothing; catalogue datasets are never prepared.
    NasjaxTinyText(data_dir=str(data_dir)).download_and_prepare()
    NasjaxTinyGlue(config="pairs", data_dir=str(data_dir)).download_and_prepare()
    return str(data_dir)


def test_documents_and_not_prepared_error(tfds_dir, tmp_path):
    docs = list(tfds_source.tfds_documents("nasjax_tiny_text", "train", data_dir=tfds_dir))
    assert sorted(docs) == sorted(TRAIN_DOCS)  # tfds stores examples in its own (stable) order
    assert docs == list(tfds_source.tfds_documents("nasjax_tiny_text", "train", data_dir=tfds_dir))
    val = list(tfds_source.tfds_documents("nasjax_tiny_text", "validation", tfds_dir, max_examples=2))
    assert len(val) == 2 and set(val) <= set(VAL_DOCS)
    with pytest.raises(DataError, match="not prepared.*never"):
        list(tfds_source.tfds_documents("nasjax_tiny_text", "train", data_dir=str(tmp_path / "elsewhere")))
    with pytest.raises(DataError, match="no feature 'body'"):
        list(tfds_source.tfds_documents("nasjax_tiny_text", "train", tfds_dir, text_key="body"))


def test_lm_data_from_tfds_is_tokenized_once(tfds_dir, tmp_path, monkeypatch):
    args = dict(data_dir=tfds_dir, cache_dir=tmp_path, seq_len=16, global_batch_size=4, log=lambda _: None)
    lm = tfds_source.make_tfds_lm_data("nasjax_tiny_text", **args)
    tok = ByteTokenizer()
    docs = tfds_source.tfds_documents("nasjax_tiny_text", "validation", tfds_dir)
    expected = np.concatenate([np.append(tok.encode(d), tok.eos_id) for d in docs])
    np.testing.assert_array_equal(lm.val_tokens, expected)
    batch = next(lm.train_iterator())
    assert batch["inputs"].shape == (4, 16) and np.array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    monkeypatch.setattr(tfds_source, "tfds_documents", lambda *a, **k: pytest.fail("read tfds again"))
    again = tfds_source.make_tfds_lm_data("nasjax_tiny_text", **args)
    np.testing.assert_array_equal(again.train_tokens, lm.train_tokens)


def test_sentencepiece_mlm_from_tfds(tfds_dir, tmp_path):
    lm = tfds_source.make_tfds_lm_data(
        "nasjax_tiny_text",
        tokenizer="sentencepiece",
        vocab_size=300,
        kind="mlm",
        data_dir=tfds_dir,
        cache_dir=tmp_path,
        seq_len=16,
        global_batch_size=4,
        log=lambda _: None,
    )
    assert lm.tokenizer.to_config()["kind"] == "sentencepiece"
    batch = next(lm.train_iterator())
    assert (batch["targets"][:, 0] == lm.tokenizer.cls_id).all() and batch["padding_mask"].all()
    assert sorted(lm.tokenizer.decode(lm.val_tokens).split("held out")) == sorted(
        ["", *(d.removeprefix("held out") for d in VAL_DOCS)]
    )


def test_glue_style_pairs_to_classification(tfds_dir, tmp_path):
    with pytest.raises(DataError, match="no labelled examples"):
        tfds_source.tfds_classification_jsonl(
            "nasjax_tiny_glue/pairs", "test", tmp_path / "test.jsonl", tfds_dir, ("sentence1", "sentence2")
        )
    with pytest.raises(DataError, match="give text_keys"):
        tfds_source.tfds_classification_jsonl("nasjax_tiny_glue/pairs", "train", tmp_path / "t.jsonl", tfds_dir)
    ds = tfds_source.make_glue_data(
        "nasjax_tiny_glue/pairs",
        seq_len=32,
        global_batch_size=4,
        data_dir=tfds_dir,
        cache_dir=tmp_path,
        text_keys=("sentence1", "sentence2"),
    )
    assert ds.n_classes == 2 and ds.num_train == 20 and ds.num_val == 3
    lines = next(iter((tmp_path / "tfds_jsonl").glob("*_train.jsonl"))).read_text().splitlines()
    records = {json.dumps(json.loads(line), sort_keys=True) for line in lines}
    assert records == {json.dumps({"label": y, "text": a, "text_b": b}, sort_keys=True) for a, b, y in PAIRS}
    tok = ds.tokenizer
    for row, label in zip(ds.val_ids, ds.val_labels):
        a, b, _ = PAIRS[1 - label]  # label 1 is the cat pair, 0 the weather pair
        assert (row == tok.sep_id).sum() == 2 and tok.decode(row) == a + b
    batch = next(ds.train_iterator())
    assert batch["labels"].dtype == np.int32 and batch["inputs"].shape == (4, 32)


def test_glue_text_keys_table():
    assert tfds_source.GLUE_TEXT_KEYS["sst2"] == ("sentence",)
    assert tfds_source.GLUE_TEXT_KEYS["mnli"] == ("premise", "hypothesis")


@pytest.fixture
def seqio_task():
    seqio = pytest.importorskip("seqio")
    name = "nasjax_test_tiny_task"

    def dataset_fn(split, shuffle_files, seed=None):
        return tf.data.Dataset.from_tensor_slices({"text": TRAIN_DOCS if split == "train" else VAL_DOCS})

    def lower(ds):
        return ds.map(lambda ex: {"text": tf.strings.lower(ex["text"])})

    vocab = seqio.PassThroughVocabulary(size=0)
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(dataset_fn, splits=["train", "validation"]),
        output_features={"text": seqio.Feature(vocab, add_eos=False, dtype=tf.string, rank=0)},
        preprocessors=[lower],
    )
    yield name
    seqio.TaskRegistry.remove(name)


def test_seqio_task_documents_and_lm_data(seqio_task, tmp_path):
    assert list(tfds_source.seqio_documents(seqio_task, "validation")) == VAL_DOCS
    processed = list(tfds_source.seqio_documents(seqio_task, "validation", preprocessed=True, max_examples=2))
    assert processed == [d.lower() for d in VAL_DOCS[:2]]
    lm = tfds_source.make_seqio_lm_data(
        seqio_task, cache_dir=tmp_path, seq_len=16, global_batch_size=2, log=lambda _: None
    )
    assert ByteTokenizer().decode(lm.val_tokens).startswith(VAL_DOCS[0])
    assert next(lm.train_iterator())["inputs"].shape == (2, 16)
    with pytest.raises(DataError, match="no seqio Task"):
        list(tfds_source.seqio_documents("nasjax_no_such_task", "train"))
