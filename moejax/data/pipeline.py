"""From a TFDS dataset on disk to fixed-length token batches, with grain.

    prepare(config)             build the dataset (built-in names) and the tokenizer if missing
    train_iterator(config, ..)  infinite, shuffled, per-process, checkpointable batches
    eval_batches(config, ..)    one deterministic pass over the eval split, finite

Both streams read `tfds.data_source` (array_record, random access), tokenize each document and
append `eos_id`, then pack with concatenate-and-chunk: the documents' tokens are laid end to end
and cut into rows of `seq_len + 1`, so every token lands in exactly one row and nothing is padded
except the very end of a finite stream. A row `x` gives `inputs = x[:-1]`, `targets = x[1:]`.

Batches are dicts of numpy arrays, `b` = per-process batch size, `L` = seq_len:
    inputs  (b, L) int32    targets (b, L) int32    mask (b, L) bool: True where the target is a
                                                    real token (never inferred from token values)

Training: documents are shuffled with `shuffle_seed`, reshuffled every epoch (grain derives each
epoch's permutation from the seed and the epoch number), repeated forever, packed, and the packed
rows are shuffled again in windows of `shuffle_window` rows so one batch does not hold consecutive
slices of a document. `DataConfig.process_sharding` says how processes share that stream:

    "batch_rows"  every process builds the same stream of global batches of
                  `batch_size * process_count` rows from all documents and keeps rows
                  `[process_index * batch_size, (process_index + 1) * batch_size)` of each, so
                  `jax.make_array_from_process_local_data` assembles exactly the batch a single
                  process would see; every process reads and tokenizes the whole split.
    "documents"   process i shuffles and packs only the documents `[i::process_count]` into its
                  own batches of `batch_size` rows; each process reads 1/process_count of the
                  data, but the global batches change with the number of processes.

The iterator's `get_state()`/`set_state()` (JSON-serialisable; `grain.checkpoint.CheckpointSave`
/ `CheckpointRestore` store it beside an Orbax checkpoint) resume the exact stream. With
"batch_rows" the state is the global stream's, the same on every process and valid for any number
of processes (grain's checkpoint files, though, are named per process count).

Evaluation: every process packs the whole eval split in file order and keeps its own block of
`batch_size` rows from each global batch of `batch_size * process_count` rows; the last global
batch is padded with rows whose mask is all False. So every process yields the same number of
batches (collective eval steps never wait on a process that ran dry), and the eval sequences, hence
the metric, do not depend on the number of processes. The price is that each process tokenizes
the whole eval split; `max_batches` bounds it.
"""

from __future__ import annotations

import functools
import os
import uuid
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from moejax.data import corpora
from moejax.data.config import DataConfig
from moejax.data.tokenizer import SentencePieceTokenizer, Tokenizer, WordTokenizer
from moejax.data.tokenizer import train_sentencepiece

_TOKENS = "tokens"  # the packed feature; the packer adds tokens_segment_ids (0 = padding)


# ------------------------------------------------------------------------------------------------
# Dataset and tokenizer preparation.


def _dataset_builder(config: DataConfig) -> tfds.core.DatasetBuilder:
  """The dataset's builder; the built-in datasets are built first if missing."""
  data_dir = str(config.resolved_data_dir())
  if config.name in corpora.BUILDERS:
    return corpora.build(config.name, data_dir)
  try:
    return tfds.builder(config.name, data_dir=data_dir)
  except Exception as e:  # TFDS raises several kinds, some from its optional TensorFlow imports
    first_line = str(e).strip().split("\n")[0]  # TFDS appends the list of all its datasets
    raise ValueError(f"data.name={config.name!r}: TFDS cannot find this dataset in "
                     f"{data_dir} ({type(e).__name__}: {first_line}).") from e


def _check_prepared(config: DataConfig, builder: tfds.core.DatasetBuilder) -> None:
  """Raises ValueError unless `builder` has array_record data with the configured key/splits."""
  if not builder.is_prepared():
    raise ValueError(
        f"data.name={config.name!r} is not prepared in {builder.data_dir}. moejax builds "
        f"only {sorted(corpora.BUILDERS)} itself; prepare other datasets where they can be "
        "downloaded, e.g. `tfds build NAME --file_format=array_record --data_dir=DIR`, and point "
        "data.data_dir (or $MOEJAX_DATA_DIR) at that directory.")
  file_format = builder.info.file_format
  if file_format is not None and file_format.value != "array_record":
    raise ValueError(f"data.name={config.name!r} is stored as {file_format.value!r}; "
                     "moejax reads only 'array_record' (random access, no TensorFlow).")
  features = builder.info.features
  if config.text_key not in features:
    raise ValueError(f"data.text_key={config.text_key!r} is not a feature of "
                     f"{config.name!r}; its features are {sorted(features.keys())}.")
  for field in ("train_split", "eval_split"):
    split = getattr(config, field)
    if split not in builder.info.splits:
      raise ValueError(f"data.{field}={split!r} is not a split of {config.name!r}; its "
                       f"splits are {sorted(builder.info.splits.keys())}.")


def tokenizer_path(config: DataConfig, dataset_dir: epath.PathLike) -> epath.Path:
  """Where the tokenizer of `config` lives: beside the dataset's files."""
  if config.tokenizer_kind == "word":
    return epath.Path(dataset_dir) / "moejax_word_vocab.txt"
  kind = config.sentencepiece_model_type
  return epath.Path(dataset_dir) / f"moejax_spm_{kind}_{config.vocab_size}.model"


def _document_texts(source: Any, text_key: str):
  for start in range(0, len(source), 256):
    for example in source.__getitems__(list(range(start, min(start + 256, len(source))))):
      text = example[text_key]
      yield text.decode("utf-8") if isinstance(text, bytes) else str(text)


def _write_atomically(path: epath.Path, data: bytes) -> None:
  """Writes `path` whole or not at all.

  Two runs that start on one dataset at once may both build the same tokenizer (training is
  deterministic, so the bytes agree): each writes its own partial file, and the last atomic
  replace wins.
  """
  partial = path.parent / f"{path.name}.incomplete-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  partial.write_bytes(data)
  partial.replace(path)


def prepare(config: DataConfig) -> Tokenizer:
  """Builds what is missing (the built-in dataset, the tokenizer), then returns the tokenizer.

  Idempotent: a second call only loads. With several processes on one shared filesystem, call it
  on one process first (the others then only load).
  """
  builder = _dataset_builder(config)
  _check_prepared(config, builder)
  path = tokenizer_path(config, builder.data_dir)
  if path.exists():
    return WordTokenizer.load(path) if config.tokenizer_kind == "word" else (
        SentencePieceTokenizer.load(path))
  texts = _document_texts(_data_source(config, config.train_split), config.text_key)
  if config.tokenizer_kind == "word":
    tokenizer = WordTokenizer.from_texts(texts)
    _write_atomically(path, tokenizer.serialize().encode("utf-8"))
  else:
    tokenizer = train_sentencepiece(texts, vocab_size=config.vocab_size,
                                    model_type=config.sentencepiece_model_type,
                                    max_chars=config.tokenizer_train_chars)
    _write_atomically(path, tokenizer.model_proto)
  return tokenizer


def _data_source(config: DataConfig, split: str) -> Any:
  data_dir = str(config.resolved_data_dir())
  try:
    source = tfds.data_source(config.name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # missing files surface as several exception types
    raise ValueError(f"cannot read split {split!r} of data.name={config.name!r} from "
                     f"{data_dir}: {e}. Call moejax.data.prepare(config) first.") from e
  return source


# ------------------------------------------------------------------------------------------------
# The grain streams.


def _read_and_tokenize(indices: np.ndarray, *, source: Any, tokenizer: Tokenizer,
                       text_key: str) -> dict[str, np.ndarray]:
  """Documents `indices` of `source` -> their tokens, each followed by eos, laid end to end."""
  ids = []
  for example in source.__getitems__(indices.tolist()):  # one batched array_record read
    text = example[text_key]
    ids.extend(tokenizer.encode(text.decode("utf-8") if isinstance(text, bytes) else str(text)))
    ids.append(tokenizer.eos_id)
  return {_TOKENS: np.asarray(ids, dtype=np.int32)}


def _model_batch(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Packed rows (b, L + 1) -> inputs, targets, mask (b, L)."""
  tokens = packed[_TOKENS]
  return {
      "inputs": np.ascontiguousarray(tokens[:, :-1]),
      "targets": np.ascontiguousarray(tokens[:, 1:]),
      "mask": packed[f"{_TOKENS}_segment_ids"][:, 1:] > 0,
  }


def _packed_rows(doc_indices: grain.MapDataset, source: Any, config: DataConfig,
                 tokenizer: Tokenizer) -> grain.IterDataset:
  """Document indices -> tokenized documents (+ eos) -> rows of seq_len + 1 tokens.

  Documents are read and tokenized `read_batch_size` at a time (one batched read instead of one
  per document); concatenate-and-chunk packing makes the rows independent of that grouping.
  """
  tokens = doc_indices.batch(config.read_batch_size).map(functools.partial(
      _read_and_tokenize, source=source, tokenizer=tokenizer, text_key=config.text_key))
  read_options = grain.ReadOptions(num_threads=config.read_threads,
                                   prefetch_buffer_size=config.prefetch_buffer_size)
  return grain.experimental.ConcatThenSplitIterDataset(
      tokens.to_iter_dataset(read_options), length_struct={_TOKENS: config.seq_len + 1})


def _check_processes(batch_size: int, process_index: int, process_count: int) -> None:
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r} is invalid: expected an integer >= 1.")
  if not isinstance(process_count, int) or process_count < 1:
    raise ValueError(f"process_count={process_count!r} is invalid: expected an integer >= 1.")
  if not isinstance(process_index, int) or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index!r} is invalid: expected an integer in "
                     f"[0, process_count={process_count}).")


def train_iterator(config: DataConfig, tokenizer: Tokenizer, *, batch_size: int,
                   process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """The infinite training stream of this process; `batch_size` is per process.

  Returns a grain `DatasetIterator`: `next(it)` gives a batch dict, `it.get_state()` a JSON-able
  dict, and `set_state(state)` on a fresh iterator of the same arguments resumes the stream.
  How processes divide the data follows `config.process_sharding` (see the module docstring).
  """
  _check_processes(batch_size, process_index, process_count)
  source = _data_source(config, config.train_split)
  documents = grain.MapDataset.range(len(source))
  by_documents = config.process_sharding == "documents"
  if by_documents:
    if process_count > len(source):
      raise ValueError(f"process_count={process_count} exceeds the {len(source)} documents of "
                       f"split {config.train_split!r}: some processes would get none.")
    documents = documents[process_index::process_count]
  order = documents.shuffle(seed=config.shuffle_seed).repeat()
  rows = _packed_rows(order, source, config, tokenizer)
  if config.shuffle_window > 0:
    rows = grain.experimental.WindowShuffleIterDataset(
        rows, window_size=config.shuffle_window, seed=config.shuffle_seed)
  if by_documents:
    batches = rows.batch(batch_size, drop_remainder=True).map(_model_batch)
  else:  # global batches; this process keeps its block of rows
    batches = rows.batch(batch_size * process_count, drop_remainder=True).map(
        functools.partial(_process_block, batch_size=batch_size, process_index=process_index,
                          process_count=process_count))
  return _JsonStateIterator(iter(batches))


class _JsonStateIterator(grain.DatasetIterator):
  """Passes batches and state through, repairing state that went through JSON.

  grain 0.2.18's concat-then-split packer marks "no partial document" with the tuple (-1, -1) and
  compares with `!=`; JSON (grain.checkpoint's format) gives back the list [-1, -1], which the
  packer then takes for a partial document and silently drops that document on restore. Turning
  `remainder_slices` back into tuples makes restored state behave like the original.
  """

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(_slices_as_tuples(state))


def _slices_as_tuples(state: Any) -> Any:
  if not isinstance(state, dict):
    return state
  return {key: ({k: tuple(v) for k, v in value.items()} if key == "remainder_slices" else
                _slices_as_tuples(value)) for key, value in state.items()}


def _process_block(packed: dict[str, np.ndarray], *, batch_size: int, process_index: int,
                   process_count: int) -> dict[str, np.ndarray]:
  """A global batch (at most batch_size * process_count rows) -> this process's rows, padded.

  Rows past the end of a short (final eval) batch are zeros: padding with mask False.
  """
  global_rows = batch_size * process_count
  start = process_index * batch_size
  block = {}
  for key, rows in packed.items():
    padded = np.zeros((global_rows, *rows.shape[1:]), rows.dtype)
    padded[:len(rows)] = rows
    block[key] = padded[start:start + batch_size]
  return _model_batch(block)


def eval_batches(config: DataConfig, tokenizer: Tokenizer, *, batch_size: int,
                 process_index: int = 0, process_count: int = 1,
                 max_batches: int | None = None) -> grain.IterDataset:
  """One pass over `config.eval_split`; iterate it again for another identical pass.

  Every process yields the same number of batches (see the module docstring); rows past the end
  of the split are all padding with mask False.
  """
  _check_processes(batch_size, process_index, process_count)
  if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
    raise ValueError(f"max_batches={max_batches!r} is invalid: expected None or an integer >= 1.")
  source = _data_source(config, config.eval_split)
  rows = _packed_rows(grain.MapDataset.range(len(source)), source, config, tokenizer)
  batches = rows.batch(batch_size * process_count).map(
      functools.partial(_process_block, batch_size=batch_size, process_index=process_index,
                        process_count=process_count))
  if max_batches is not None:
    batches = grain.experimental.LimitIterDataset(batches, max_batches)
  return batches
