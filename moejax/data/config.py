"""`DataConfig`: the typed, validated settings of the input pipeline.

Experiment files hold an `ml_collections.ConfigDict`; `data_config_from(cfg.data)` turns it into a
frozen `DataConfig` at the edge, rejecting unknown fields, so no data module reads a ConfigDict.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, ClassVar

from etils import epath

from moejax import typed_config
from moejax.typed_config import ConfigError

# Tokenizer kinds. "auto" picks "word" for the word-level Penn Treebank and "sentencepiece" for
# every other dataset.
TOKENIZER_KINDS = ("auto", "sentencepiece", "word")
SENTENCEPIECE_MODEL_TYPES = ("bpe", "unigram")
# How the training stream is divided between processes (see DataConfig.process_sharding).
PROCESS_SHARDINGS = ("batch_rows", "documents")
# 256 byte-fallback pieces + pad, unk, eos + at least one learned piece.
MIN_SENTENCEPIECE_VOCAB = 260


def _fail(field: str, value: Any, allowed: str) -> None:
  raise ConfigError(f"data.{field}", value, f"is invalid: {allowed}.")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the text comes from and how it becomes fixed-length token batches.

  Attributes:
    name: a TFDS dataset name. "moejax_public_domain" (the default, built offline from installed
      packages) and "ptb" (Penn Treebank, Mikolov splits) are built by `prepare`; any other name
      (lm1b, c4, ...) must already be prepared on disk in array_record form.
    data_dir: TFDS data directory; None -> $MOEJAX_DATA_DIR, else ~/tensorflow_datasets.
    vocab_size: SentencePiece vocabulary size including pad/unk/eos (ignored by word tokenizers).
    text_key: the feature holding each document's text.
    seq_len: tokens per example fed to the model; packed rows hold seq_len + 1 tokens.
    shuffle_seed: seeds the per-epoch document order and the packed-sequence shuffle window.
    train_split: split the training stream reads.
    eval_split: split `eval_batches` reads ("validation"; "test" for a final PTB number).
    tokenizer: "auto", "sentencepiece" or "word".
    sentencepiece_model_type: "bpe" or "unigram".
    tokenizer_train_chars: at most this many characters of the training split train the
      SentencePiece model (the first documents in file order).
    shuffle_window: packed sequences are shuffled in windows of this many (0 = off), so one
      batch does not hold consecutive slices of a single document.
    read_batch_size: documents read and tokenized together (batched array_record reads); the
      token stream does not depend on it.
    read_threads: grain reader threads that fetch and tokenize documents (0 = in the caller).
    prefetch_buffer_size: document groups kept ready ahead of the consumer.
    process_sharding: how several processes share the training stream.
      "batch_rows" (default): every process reads the whole split and builds the same shuffled,
        packed stream of global batches, then keeps its own contiguous block of rows of each one.
        The global batches, hence the training run, are the same for any number of processes
        (a 2-process run repeats a 1-process run, and a checkpoint resumes on another process
        count), at the price of every process reading and tokenizing all the data: right for
        small corpora and for reproducibility.
      "documents": process i reads only the documents `i::process_count` and packs and shuffles
        them on its own. Each process reads 1/process_count of the data, which scales to large
        corpora, but the global batches depend on the number of processes.
  """

  PATH: ClassVar[str] = "data"

  name: str = "moejax_public_domain"
  data_dir: str | None = None
  vocab_size: int = 8192
  text_key: str = "text"
  seq_len: int = 128
  shuffle_seed: int = 0
  train_split: str = "train"
  eval_split: str = "validation"
  tokenizer: str = "auto"
  sentencepiece_model_type: str = "bpe"
  tokenizer_train_chars: int = 100_000_000
  shuffle_window: int = 1024
  read_batch_size: int = 32
  read_threads: int = 1
  prefetch_buffer_size: int = 4
  process_sharding: str = "batch_rows"

  def __post_init__(self):
    typed_config.check_fields(self)
    for field in ("name", "text_key", "train_split", "eval_split"):
      value = getattr(self, field)
      if not isinstance(value, str) or not value:
        _fail(field, value, "expected a non-empty string")
    if self.data_dir is not None and (not isinstance(self.data_dir, str) or not self.data_dir):
      _fail("data_dir", self.data_dir, "expected None or a non-empty path")
    _check_int(self, "vocab_size", MIN_SENTENCEPIECE_VOCAB,
               "256 byte pieces + pad, unk, eos + one learned piece")
    _check_int(self, "seq_len", 1)
    _check_int(self, "tokenizer_train_chars", 1)
    _check_int(self, "shuffle_window", 0)
    _check_int(self, "read_batch_size", 1)
    _check_int(self, "read_threads", 0)
    _check_int(self, "prefetch_buffer_size", 1)
    if not isinstance(self.shuffle_seed, int) or not 0 <= self.shuffle_seed < 2**32:
      _fail("shuffle_seed", self.shuffle_seed, "expected an integer in [0, 2**32)")
    if self.tokenizer not in TOKENIZER_KINDS:
      _fail("tokenizer", self.tokenizer, f"expected one of {TOKENIZER_KINDS}")
    if self.process_sharding not in PROCESS_SHARDINGS:
      _fail("process_sharding", self.process_sharding, f"expected one of {PROCESS_SHARDINGS}")
    if self.sentencepiece_model_type not in SENTENCEPIECE_MODEL_TYPES:
      _fail("sentencepiece_model_type", self.sentencepiece_model_type,
            f"expected one of {SENTENCEPIECE_MODEL_TYPES}")

  @property
  def tokenizer_kind(self) -> str:
    """The concrete tokenizer: "word" or "sentencepiece"."""
    if self.tokenizer != "auto":
      return self.tokenizer
    return "word" if self.name == "ptb" else "sentencepiece"

  def resolved_data_dir(self) -> epath.Path:
    """`data_dir`, else $MOEJAX_DATA_DIR, else ~/tensorflow_datasets."""
    path = self.data_dir or os.environ.get("MOEJAX_DATA_DIR") or "~/tensorflow_datasets"
    return epath.Path(path).expanduser()


def _check_int(config: DataConfig, field: str, minimum: int, why: str = "") -> None:
  value = getattr(config, field)
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    reason = f" ({why})" if why else ""
    _fail(field, value, f"expected an integer >= {minimum}{reason}")


def data_config_from(cfg: Mapping[str, Any] | Any) -> DataConfig:
  """Builds a `DataConfig` from a mapping or `ml_collections.ConfigDict`.

  Raises:
    ValueError: on a field `DataConfig` does not have, naming it and listing those it has.
  """
  return typed_config.build(DataConfig, cfg)
