"""Tests for moejax.data: the TFDS builders, the tokenizers and the grain streams.

Every dataset is built into a pytest tmp directory, never ~/tensorflow_datasets. Expected token
streams are computed independently: from the fixture files or the installed packages, encoded
document by document and concatenated with numpy, not through TFDS or grain.
"""

import collections
import pathlib
import shutil
import threading

import grain
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
import treebank
from etils import epath
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax import data
from moejax.data import corpora

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
PTB_FIXTURE_TRAIN_DOCS = 40


# ------------------------------------------------------------------------------------------------
# Helpers and shared datasets.


def _lines(path: pathlib.Path) -> list[str]:
  return [" ".join(line.split()) for line in path.read_text().split("\n") if line.strip()]


def _encode_docs(tokenizer, texts) -> list[tuple[int, ...]]:
  return [tuple(tokenizer.encode(t)) + (tokenizer.eos_id,) for t in texts]


def _rows(batch) -> np.ndarray:
  """The packed rows (b, L + 1) a batch was cut from."""
  return np.concatenate([batch["inputs"][:, :1], batch["targets"]], axis=1)


def _stream(batches) -> np.ndarray:
  """The real tokens of a sequence of batches, in order (a row's padding tail is dropped)."""
  out = []
  for batch in batches:
    for row, mask in zip(_rows(batch), batch["mask"]):
      if mask.any():
        out.append(row[:mask.sum() + 1])
  return np.concatenate(out)


def _documents(stream: np.ndarray, eos_id: int) -> list[tuple[int, ...]]:
  """Splits a token stream after each eos; a trailing partial document is dropped."""
  ends = np.flatnonzero(stream == eos_id)
  starts = np.concatenate([[0], ends[:-1] + 1])
  return [tuple(stream[s:e + 1].tolist()) for s, e in zip(starts, ends)]


def _take(iterator, n: int) -> list[dict]:
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(expected, actual):
  assert len(expected) == len(actual)
  for a, b in zip(expected, actual):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def ptb_fixture(tmp_path_factory):
  """PTB built from tests/fixtures/ptb (40/8/6 sentences), with its word vocabulary."""
  data_dir = tmp_path_factory.mktemp("ptb_fixture")
  corpora.build("ptb", data_dir, source_dir=FIXTURES / "ptb")
  config = data.DataConfig(name="ptb", data_dir=str(data_dir), seq_len=16, shuffle_window=0,
                           read_batch_size=3)
  return config, data.prepare(config)


@pytest.fixture(scope="module")
def public_domain_fixture(tmp_path_factory):
  """moejax_public_domain built from tests/fixtures/public_domain, with a small BPE model."""
  data_dir = tmp_path_factory.mktemp("public_domain_fixture")
  builder = corpora.build("moejax_public_domain", data_dir,
                          source_dir=FIXTURES / "public_domain", validation_fraction=0.25,
                          passage_chars=200)
  config = data.DataConfig(data_dir=str(data_dir), vocab_size=400, seq_len=32)
  return config, data.prepare(config), builder


@pytest.fixture(scope="module")
def real_ptb(tmp_path_factory):
  config = data.DataConfig(name="ptb", data_dir=str(tmp_path_factory.mktemp("real_ptb")))
  return config, data.prepare(config)


@pytest.fixture(scope="module")
def real_public_domain(tmp_path_factory):
  config = data.DataConfig(data_dir=str(tmp_path_factory.mktemp("real_public_domain")))
  return config, data.prepare(config)


def _texts(config: data.DataConfig, split: str) -> list[str]:
  return [example["text"].decode() for example in _examples(config, split)]


def _examples(config: data.DataConfig, split: str) -> list[dict]:
  source = tfds.data_source(config.name, split=split, data_dir=config.data_dir, download=False)
  return source.__getitems__(list(range(len(source))))  # one batched read


# ------------------------------------------------------------------------------------------------
# Builders.


def test_public_domain_builder_from_fixture(public_domain_fixture):
  config, _, builder = public_domain_fixture
  docs = list(builder.documents())
  train, validation = _texts(config, "train"), _texts(config, "validation")
  assert train and validation
  # Each document lands in the split its group hashes to, in generation order.
  assert train == [d.text for d in docs if not corpora.in_validation(d.group, 0.25)]
  assert validation == [d.text for d in docs if corpora.in_validation(d.group, 0.25)]
  # The passages of a work give back its paragraphs.
  work = (FIXTURES / "public_domain" / "songs_of_the_seasons.txt").read_text()
  paragraphs = [p.strip() for p in work.split("\n\n") if p.strip()]
  joined = "\n\n".join(corpora.passages(work, 200))
  assert joined.split("\n\n") == paragraphs
  assert "café" in joined and "rain—" in joined


def test_ptb_builder_from_fixture(ptb_fixture):
  config, _ = ptb_fixture
  for split, name in corpora.PTB_FILES.items():
    assert _texts(config, split) == _lines(FIXTURES / "ptb" / name)
  assert len(_texts(config, "train")) == PTB_FIXTURE_TRAIN_DOCS


def test_public_domain_builder_from_installed_packages(real_public_domain):
  config, _ = real_public_domain
  ids = {split: [e["id"].decode() for e in _examples(config, split)]
         for split in ("train", "validation")}
  all_ids = ids["train"] + ids["validation"]
  sources = collections.Counter(i.split("/")[0] for i in all_ids)
  assert sources == {"kjv": 1189, "web": 1189, "asv": 1189, "shakespeare": 1208}
  assert len(set(shakespeare_work for _, shakespeare_work, _ in
                 (i.split("/") for i in all_ids if i.startswith("shakespeare")))) == 42
  # The three translations of a chapter share a split: no chapter is in both.
  groups = {split: {i.split("/", 1)[1] for i in v if not i.startswith("shakespeare")}
            for split, v in ids.items()}
  assert not groups["train"] & groups["validation"]
  assert 0.01 < len(ids["validation"]) / len(all_ids) < 0.04
  genesis = _texts(config, "train")[0]
  assert genesis.startswith("In the beginning God created the heaven and the earth. And the")
  assert "[" not in genesis and "darkness was upon" in genesis


def test_a_dataset_another_process_is_building_is_waited_for(tmp_path):
  """Runs that start on one missing dataset at once build it one at a time (without the lock,
  two of a study's parallel runs raced to rename TFDS's finished build: FileExistsError)."""
  results = []
  build = lambda: results.append(
      corpora.build("ptb", tmp_path, source_dir=FIXTURES / "ptb").is_prepared())
  with corpora._building(tmp_path, "ptb"):  # pylint: disable=protected-access
    waiting = threading.Thread(target=build)
    waiting.start()
    waiting.join(2.0)
    assert waiting.is_alive() and not (tmp_path / "ptb").exists()
  waiting.join(60)
  assert results == [True]
  # Several at once with nothing built: one builds, the others find it built.
  shutil.rmtree(tmp_path / "ptb")
  results.clear()
  threads = [threading.Thread(target=build) for _ in range(3)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(60)
  assert results == [True, True, True]
  assert len(list(tfds.data_source("ptb", split="test", data_dir=str(tmp_path)))) == 6


def test_ptb_builder_from_installed_package(real_ptb):
  config, tokenizer = real_ptb
  for split, package_split, sentences, words in [("train", "train", 42068, 887521),
                                                 ("validation", "valid", 3370, 70390),
                                                 ("test", "test", 3761, 78669)]:
    texts = _texts(config, split)
    assert len(texts) == sentences
    assert sum(len(t.split()) for t in texts) == words
    assert texts == [" ".join(s.split()) for s in treebank.penn[package_split].split("\n")
                     if s.strip()]
  # Mikolov's 10k vocabulary (9,999 words incl. <unk>, + <eos>) plus the pad id.
  assert (tokenizer.vocab_size, tokenizer.pad_id, tokenizer.eos_id) == (10001, 0, 1)


def test_in_validation_is_a_stable_fraction():
  groups = [f"g{i}" for i in range(20000)]
  chosen = [g for g in groups if corpora.in_validation(g, 0.02)]
  assert chosen == [g for g in groups if corpora.in_validation(g, 0.02)]
  assert 0.015 < len(chosen) / len(groups) < 0.025


# ------------------------------------------------------------------------------------------------
# Tokenizers.


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_sentencepiece_round_trips_any_text(public_domain_fixture, text):
  _, tokenizer, _ = public_domain_fixture
  ids = tokenizer.encode(text)
  assert tokenizer.decode(ids) == text
  assert all(i not in (tokenizer.pad_id, tokenizer.eos_id) for i in ids)
  assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_sentencepiece_round_trips_real_text(real_public_domain):
  config, tokenizer = real_public_domain
  assert (tokenizer.vocab_size, tokenizer.pad_id) == (8192, 0)
  for text in _texts(config, "validation")[:20]:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text) / 3  # a real subword vocabulary, not characters


def test_sentencepiece_training_is_deterministic_and_saved(public_domain_fixture):
  config, tokenizer, builder = public_domain_fixture
  texts = _texts(config, "train")
  again = data.train_sentencepiece(texts, vocab_size=400)
  assert again.model_proto == tokenizer.model_proto
  path = data.tokenizer_path(config, builder.data_dir)
  assert path.read_bytes() == tokenizer.model_proto
  assert data.prepare(config).model_proto == tokenizer.model_proto  # loaded, not retrained


def test_word_tokenizer(ptb_fixture):
  config, tokenizer = ptb_fixture
  train_words = {w for t in _texts(config, "train") for w in t.split()}
  assert tokenizer.vocab_size == len(train_words) + 2  # + pad, eos (<unk> is a PTB word)
  for text in _texts(config, "validation"):
    assert tokenizer.decode(tokenizer.encode(text)) == " ".join(
        w if w in train_words else "<unk>" for w in text.split())
  unk = tokenizer.encode("<unk>")[0]
  assert tokenizer.encode("zebra the") == [unk, tokenizer.encode("the")[0]]
  assert tokenizer.encode("the")[0] == 2  # the most frequent word takes the first word id
  path = data.tokenizer_path(config, epath.Path(config.data_dir) / "ptb" / "1.0.0")
  assert data.WordTokenizer.load(path).serialize() == tokenizer.serialize()


# ------------------------------------------------------------------------------------------------
# Packing.


@pytest.mark.parametrize("batch_size", [1, 3])
def test_eval_packing_matches_numpy_concatenation(ptb_fixture, batch_size):
  config, tokenizer = ptb_fixture
  expected = np.concatenate(_encode_docs(tokenizer, _lines(FIXTURES / "ptb" / "ptb.valid.txt")))
  batches = list(data.eval_batches(config, tokenizer, batch_size=batch_size))
  rows = np.concatenate([_rows(b) for b in batches])
  masks = np.concatenate([b["mask"] for b in batches])
  n_rows = -(-len(expected) // (config.seq_len + 1))
  assert len(rows) == -(-n_rows // batch_size) * batch_size
  assert masks[:n_rows - 1].all() and not masks[n_rows:].any()
  np.testing.assert_array_equal(_stream(batches), expected)
  # Every row is cut from the stream at a multiple of seq_len + 1; padding is zeros.
  padded = np.zeros(len(rows) * (config.seq_len + 1), np.int32)
  padded[:len(expected)] = expected
  np.testing.assert_array_equal(rows.reshape(-1), padded)
  for batch in batches:
    assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
    assert batch["mask"].dtype == bool
    assert batch["inputs"].shape == batch["mask"].shape == (batch_size, config.seq_len)


def test_eval_packing_of_real_ptb_validation(real_ptb):
  config, tokenizer = real_ptb
  sentences = [s for s in treebank.penn["valid"].split("\n") if s.strip()]
  expected = np.concatenate(_encode_docs(tokenizer, sentences))
  assert len(expected) == 70390 + 3370  # words + one <eos> per sentence
  batches = list(data.eval_batches(config, tokenizer, batch_size=16))
  np.testing.assert_array_equal(_stream(batches), expected)


def test_train_stream_is_every_document_once_per_epoch(ptb_fixture):
  config, tokenizer = ptb_fixture
  docs = _encode_docs(tokenizer, _lines(FIXTURES / "ptb" / "ptb.train.txt"))
  it = data.train_iterator(config, tokenizer, batch_size=2)
  batches = _take(it, 40)  # 2 * 40 rows of 17 tokens: more than two epochs of ~480 tokens
  assert all(b["mask"].all() for b in batches)
  stream = np.concatenate([_rows(b).reshape(-1) for b in batches])
  seen = _documents(stream, tokenizer.eos_id)
  epoch1, epoch2 = seen[:len(docs)], seen[len(docs):2 * len(docs)]
  assert collections.Counter(epoch1) == collections.Counter(docs)
  assert collections.Counter(epoch2) == collections.Counter(docs)
  assert epoch1 != docs and epoch2 != epoch1  # shuffled, and reshuffled each epoch


def test_shuffle_window_permutes_packed_rows(ptb_fixture):
  config, tokenizer = ptb_fixture
  plain = _take(data.train_iterator(config, tokenizer, batch_size=4), 4)
  windowed = config.__class__(**{**config.__dict__, "shuffle_window": 16})
  mixed = _take(data.train_iterator(windowed, tokenizer, batch_size=4), 4)
  plain_rows = sorted(map(tuple, np.concatenate([_rows(b) for b in plain])))
  mixed_rows = [tuple(r) for b in mixed for r in _rows(b)]
  assert sorted(mixed_rows) == plain_rows
  assert mixed_rows != [tuple(r) for b in plain for r in _rows(b)]


# ------------------------------------------------------------------------------------------------
# Sharding, shuffling, checkpointing.


def test_train_shards_partition_the_documents(ptb_fixture):
  config, tokenizer = ptb_fixture
  config = config.__class__(**{**config.__dict__, "process_sharding": "documents"})
  docs = _encode_docs(tokenizer, _lines(FIXTURES / "ptb" / "ptb.train.txt"))
  process_count, union = 3, collections.Counter()
  shards = []
  for process_index in range(process_count):
    it = data.train_iterator(config, tokenizer, batch_size=1, process_index=process_index,
                             process_count=process_count)
    stream = np.concatenate([_rows(b).reshape(-1) for b in _take(it, 20)])
    shard_size = len(range(process_index, len(docs), process_count))
    shards.append(set(_documents(stream, tokenizer.eos_id)[:shard_size]))
    union.update(_documents(stream, tokenizer.eos_id)[:shard_size])
  assert union == collections.Counter(docs)
  assert all(not a & b for i, a in enumerate(shards) for b in shards[i + 1:])


def _with(config, **changes):
  return config.__class__(**{**config.__dict__, **changes})


def _joined(parts):
  """Per-step concatenation of the processes' batches (process 0's rows first)."""
  return [{key: np.concatenate([p[step][key] for p in parts]) for key in parts[0][step]}
          for step in range(len(parts[0]))]


@pytest.mark.parametrize("process_count,shuffle_window", [(2, 0), (2, 8), (4, 8)])
def test_batch_rows_processes_split_the_single_process_batches(ptb_fixture, process_count,
                                                               shuffle_window):
  config, tokenizer = ptb_fixture
  config = _with(config, shuffle_window=shuffle_window)
  assert config.process_sharding == "batch_rows"  # the default
  # 12 global batches of 4 rows x 17 tokens: about 1.7 epochs of the 40 fixture sentences.
  whole = _take(data.train_iterator(config, tokenizer, batch_size=4), 12)
  per_process = 4 // process_count
  parts = [_take(data.train_iterator(config, tokenizer, batch_size=per_process, process_index=i,
                                     process_count=process_count), 12)
           for i in range(process_count)]
  assert all(b["inputs"].shape == (per_process, config.seq_len) for p in parts for b in p)
  _assert_same_batches(whole, _joined(parts))
  # The single-process stream is the one the "documents" sharding gives a single process ...
  _assert_same_batches(whole, _take(data.train_iterator(
      _with(config, process_sharding="documents"), tokenizer, batch_size=4), 12))
  # ... while "documents" with several processes gives other global batches.
  by_documents = [_take(data.train_iterator(
      _with(config, process_sharding="documents"), tokenizer, batch_size=per_process,
      process_index=i, process_count=process_count), 12) for i in range(process_count)]
  assert not all(np.array_equal(a["inputs"], b["inputs"])
                 for a, b in zip(whole, _joined(by_documents)))


@pytest.mark.parametrize("n", [0, 5, 25])
def test_batch_rows_state_round_trips_and_fits_any_process_count(ptb_fixture, tmp_path, n):
  config, tokenizer = ptb_fixture
  config = _with(config, shuffle_window=8)
  handler = grain.checkpoint.CheckpointHandler()
  make = lambda i, count: data.train_iterator(config, tokenizer, batch_size=4 // count,
                                              process_index=i, process_count=count)
  iterators = [make(i, 2) for i in range(2)]
  for it in iterators:
    _take(it, n)
  # Both processes hold the same position: the global stream's.
  state = iterators[0].get_state()
  assert iterators[1].get_state() == state
  handler.save(epath.Path(tmp_path), item=iterators[1])  # JSON on disk, as in a checkpoint
  expected = [_take(it, 6) for it in iterators]
  for i in range(2):
    restored = make(i, 2)
    handler.restore(epath.Path(tmp_path), item=restored)
    _assert_same_batches(expected[i], _take(restored, 6))
  # One process continuing from the two processes' position sees the same global batches.
  single = make(0, 1)
  single.set_state(state)
  _assert_same_batches(_joined(expected), _take(single, 6))


def test_eval_shards_are_blocks_of_the_global_batch(ptb_fixture):
  config, tokenizer = ptb_fixture
  whole = list(data.eval_batches(config, tokenizer, batch_size=4))
  parts = [list(data.eval_batches(config, tokenizer, batch_size=2, process_index=i,
                                  process_count=2)) for i in range(2)]
  assert len(parts[0]) == len(parts[1]) == len(whole)
  for step, batch in enumerate(whole):
    for key in batch:
      joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
      np.testing.assert_array_equal(joined, batch[key])


def test_shuffle_is_deterministic_per_seed(ptb_fixture):
  config, tokenizer = ptb_fixture
  def first(seed):
    cfg = config.__class__(**{**config.__dict__, "shuffle_seed": seed})
    return _take(data.train_iterator(cfg, tokenizer, batch_size=4), 3)
  _assert_same_batches(first(0), first(0))
  assert not np.array_equal(first(0)[0]["inputs"], first(1)[0]["inputs"])


@pytest.mark.parametrize("shuffle_window,n", [(0, 0), (0, 3), (0, 25), (8, 0), (8, 5), (8, 25)])
def test_iterator_state_round_trips_through_a_checkpoint(ptb_fixture, tmp_path, shuffle_window,
                                                         n):
  config, tokenizer = ptb_fixture
  config = config.__class__(**{**config.__dict__, "shuffle_window": shuffle_window})
  handler = grain.checkpoint.CheckpointHandler()  # what Orbax's CheckpointSave/Restore call
  it = data.train_iterator(config, tokenizer, batch_size=2)
  _take(it, n)
  handler.save(epath.Path(tmp_path), item=it)  # JSON on disk
  expected = _take(it, 6)
  restored = data.train_iterator(config, tokenizer, batch_size=2)
  handler.restore(epath.Path(tmp_path), item=restored)
  _assert_same_batches(expected, _take(restored, 6))


def test_eval_is_finite_repeatable_and_limited(ptb_fixture):
  config, tokenizer = ptb_fixture
  stream = data.eval_batches(config, tokenizer, batch_size=2)
  _assert_same_batches(list(stream), list(stream))
  limited = list(data.eval_batches(config, tokenizer, batch_size=2, max_batches=2))
  _assert_same_batches(limited, list(stream)[:2])


# ------------------------------------------------------------------------------------------------
# Configuration and errors.


@pytest.mark.parametrize("field,value", [
    ("name", ""), ("vocab_size", 100), ("seq_len", 0), ("shuffle_seed", -1),
    ("shuffle_seed", 2**32), ("tokenizer", "bytes"), ("sentencepiece_model_type", "wordpiece"),
    ("shuffle_window", -1), ("read_batch_size", 0), ("read_threads", -1), ("seq_len", 1.5),
    ("data_dir", ""), ("eval_split", ""), ("process_sharding", "rows"),
])
def test_bad_config_values_name_the_field(field, value):
  with pytest.raises(ValueError, match=rf"data\.{field}={value!r}"):
    data.DataConfig(**{field: value})


def test_data_config_from_config_dict():
  cfg = ml_collections.ConfigDict({"name": "ptb", "seq_len": 64})
  config = data.data_config_from(cfg)
  assert (config.name, config.seq_len, config.tokenizer_kind) == ("ptb", 64, "word")
  assert data.DataConfig().tokenizer_kind == "sentencepiece"
  with pytest.raises(ValueError, match="data.seqlen=64 is not a field of data"):
    data.data_config_from({"seqlen": 64})


def test_data_dir_defaults_to_the_environment(monkeypatch, tmp_path):
  monkeypatch.setenv("MOEJAX_DATA_DIR", str(tmp_path))
  assert data.DataConfig().resolved_data_dir() == epath.Path(tmp_path)
  monkeypatch.delenv("MOEJAX_DATA_DIR")
  assert data.DataConfig().resolved_data_dir() == epath.Path("~/tensorflow_datasets").expanduser()
  assert data.DataConfig(data_dir=str(tmp_path)).resolved_data_dir() == epath.Path(tmp_path)


def test_dataset_errors(ptb_fixture, tmp_path):
  config, tokenizer = ptb_fixture
  with pytest.raises(ValueError, match="'lm1b' is not prepared"):
    data.prepare(data.DataConfig(name="lm1b", data_dir=str(tmp_path)))
  with pytest.raises(ValueError, match="TFDS cannot find"):
    data.prepare(data.DataConfig(name="no_such_dataset", data_dir=str(tmp_path)))
  with pytest.raises(ValueError, match="text_key='body'.*'id', 'text'"):
    data.prepare(config.__class__(**{**config.__dict__, "text_key": "body"}))
  with pytest.raises(ValueError, match="eval_split='valid'"):
    data.prepare(config.__class__(**{**config.__dict__, "eval_split": "valid"}))
  with pytest.raises(ValueError, match="process_index=2"):
    data.train_iterator(config, tokenizer, batch_size=1, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="batch_size=0"):
    data.eval_batches(config, tokenizer, batch_size=0)
  with pytest.raises(ValueError, match="max_batches=0"):
    data.eval_batches(config, tokenizer, batch_size=1, max_batches=0)
  with pytest.raises(ValueError, match="exceeds the 40 documents"):
    data.train_iterator(_with(config, process_sharding="documents"), tokenizer, batch_size=1,
                        process_index=0, process_count=41)
  # Splitting global batches by rows works with more processes than documents.
  rows = data.train_iterator(config, tokenizer, batch_size=1, process_index=40, process_count=41)
  assert next(rows)["inputs"].shape == (1, config.seq_len)


def test_tokenizer_file_write_is_atomic_and_tolerates_a_concurrent_writer(tmp_path):
  """Two runs building the same tokenizer at once: both writes succeed, one whole file remains."""
  from etils import epath
  from moejax.data.pipeline import _write_atomically
  path = epath.Path(tmp_path) / "moejax_spm_bpe_64.model"
  (epath.Path(tmp_path) / "moejax_spm_bpe_64.model.incomplete").write_bytes(b"stale")
  _write_atomically(path, b"first")
  _write_atomically(path, b"second")
  assert path.read_bytes() == b"second"
  leftovers = sorted(p.name for p in epath.Path(tmp_path).iterdir())
  assert leftovers == ["moejax_spm_bpe_64.model", "moejax_spm_bpe_64.model.incomplete"]
