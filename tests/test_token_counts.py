"""count_tokens: token id frequencies of a split, as the streams tokenize it (hash routing's input).

The PTB fixture (tests/fixtures/ptb: 40 training sentences, 8 validation sentences) with its word
vocabulary: every count is checked against the fixture's text read with plain Python.
"""

import collections
import pathlib

import numpy as np
import pytest

from moejax import data
from moejax.data import corpora
from moejax.routing.hash_routing import balanced_table

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def ptb(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("ptb_counts")
  corpora.build("ptb", data_dir, source_dir=FIXTURES / "ptb")
  config = data.DataConfig(name="ptb", data_dir=str(data_dir), seq_len=16)
  return config, data.prepare(config)


def _sentences(split_file):
  text = (FIXTURES / "ptb" / split_file).read_text(encoding="utf-8")
  return [line.split() for line in text.split("\n") if line.split()]


@pytest.mark.parametrize("split,split_file", [(None, "ptb.train.txt"),
                                              ("validation", "ptb.valid.txt")])
def test_counts_are_the_words_of_the_split_plus_one_eos_per_sentence(ptb, split, split_file):
  config, tokenizer = ptb
  counts = data.count_tokens(config, tokenizer, split)
  sentences = _sentences(split_file)
  assert counts.dtype == np.int64 and counts.shape == (tokenizer.vocab_size,)
  assert counts[tokenizer.eos_id] == len(sentences)
  assert counts.sum() == sum(len(s) for s in sentences) + len(sentences)
  words = collections.Counter(w for s in sentences for w in s)
  for word in ("the", "N", "shares"):
    (token,) = tokenizer.encode(word)
    assert counts[token] == words[word], word
  # The vocabulary is the training split's words: any other word counts as <unk>.
  vocabulary = {w for s in _sentences("ptb.train.txt") for w in s}
  unknown = sum(n for w, n in words.items() if w == "<unk>" or w not in vocabulary)
  assert counts[tokenizer.encode("<unk>")[0]] == unknown
  assert counts[tokenizer.pad_id] == 0


def test_balanced_table_from_the_training_counts(ptb):
  config, tokenizer = ptb
  counts = data.count_tokens(config, tokenizer)
  table = balanced_table(counts, 4, seed=0)
  loads = np.bincount(table, weights=counts, minlength=4)
  assert loads.sum() == counts.sum()
  assert loads.max() - loads.min() <= counts.max()
