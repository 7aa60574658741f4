"""Tokenizers: one small interface, a SentencePiece model and a word vocabulary (for PTB).

Every tokenizer reserves id 0 for padding (`pad_id`, so models can mask it) and has an end-of-
document id (`eos_id`) that the pipeline appends to each document. `decode` drops both.

Both are trained from the training split by `train_sentencepiece` / `WordTokenizer.from_texts`
and saved beside the dataset, so a later run loads the same file instead of training again.
Training is deterministic: the same text and settings give a byte-identical model.
"""

from __future__ import annotations

import collections
import io
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol, runtime_checkable

import sentencepiece as spm
from etils import epath

PAD_ID = 0
UNK_ID = 1
EOS_ID = 2  # SentencePiece; the word vocabulary puts eos at 1 and `<unk>` among the words
# SentencePiece skips longer training sentences; lines are cut at sentence ends before this.
_MAX_SENTENCE_BYTES = 16384
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")


@runtime_checkable
class Tokenizer(Protocol):
  """What the pipeline and the trainer need from a tokenizer."""

  @property
  def vocab_size(self) -> int: ...

  @property
  def eos_id(self) -> int: ...

  @property
  def pad_id(self) -> int: ...

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Iterable[int]) -> str: ...


class SentencePieceTokenizer:
  """A SentencePiece model with pad = 0, unk = 1, eos = 2 and byte fallback (no id is unknown)."""

  def __init__(self, model_proto: bytes):
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    if self._sp.pad_id() != PAD_ID:
      raise ValueError(f"SentencePiece model has pad id {self._sp.pad_id()}; moejax needs "
                       f"pad id {PAD_ID} so that models can mask padding.")

  @classmethod
  def load(cls, path: epath.PathLike) -> SentencePieceTokenizer:
    return cls(epath.Path(path).read_bytes())

  @property
  def model_proto(self) -> bytes:
    return self._proto

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def __reduce__(self):  # picklable for multiprocessing data workers
    return (SentencePieceTokenizer, (self._proto,))


def training_sentences(texts: Iterable[str], max_chars: int) -> Iterator[str]:
  """Lines of `texts`, cut at sentence ends when too long, until `max_chars` characters."""
  budget = max_chars
  for text in texts:
    for line in text.split("\n"):
      pieces = [line] if len(line.encode("utf-8")) < _MAX_SENTENCE_BYTES else _SENTENCE_END.split(
          line)
      for piece in filter(str.strip, pieces):
        if budget <= 0:
          return
        budget -= len(piece)
        yield piece


def train_sentencepiece(texts: Iterable[str], *, vocab_size: int, model_type: str = "bpe",
                        max_chars: int = 100_000_000) -> SentencePieceTokenizer:
  """Trains a SentencePiece model on (at most `max_chars` characters of) `texts`.

  Normalisation is the identity and whitespace is kept as written, so `decode(encode(s)) == s`
  for every string; characters outside the model's alphabet fall back to their UTF-8 bytes.
  One training thread: SentencePiece's result depends on the thread count, and this keeps the
  model the same on every machine.
  """
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=training_sentences(texts, max_chars),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=PAD_ID, unk_id=UNK_ID, eos_id=EOS_ID, bos_id=-1,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        input_sentence_size=0,
        max_sentence_length=_MAX_SENTENCE_BYTES,
        num_threads=1,
        minloglevel=2,
    )
  except RuntimeError as e:
    raise ValueError(f"SentencePiece training failed for vocab_size={vocab_size}, "
                     f"model_type={model_type!r}: {e}") from e
  return SentencePieceTokenizer(model.getvalue())


class WordTokenizer:
  """Whitespace-separated words: id 0 = `<pad>`, 1 = `<eos>`, then the words, most frequent first.

  Words outside the vocabulary map to `<unk>` (PTB already writes `<unk>` in its text).
  """

  PAD = "<pad>"
  EOS = "<eos>"
  UNK = "<unk>"

  def __init__(self, words: Sequence[str]):
    """`words`: the vocabulary without pad and eos, in id order from 2."""
    vocab = [self.PAD, self.EOS, *words]
    if self.UNK not in words:
      vocab.append(self.UNK)
    if len(set(vocab)) != len(vocab):
      raise ValueError("WordTokenizer words must be unique and must not contain "
                       f"{self.PAD!r} or {self.EOS!r}.")
    self._words = vocab
    self._ids = {w: i for i, w in enumerate(vocab)}
    self._unk_id = self._ids[self.UNK]

  @classmethod
  def from_texts(cls, texts: Iterable[str], max_words: int | None = None) -> WordTokenizer:
    """A vocabulary of the `max_words` most frequent words of `texts` (ties broken by spelling)."""
    counts = collections.Counter(w for text in texts for w in text.split())
    ranked = sorted(counts, key=lambda w: (-counts[w], w))
    return cls(ranked[:max_words])

  @classmethod
  def load(cls, path: epath.PathLike) -> WordTokenizer:
    vocab = epath.Path(path).read_text(encoding="utf-8").split("\n")
    if vocab[:2] != [cls.PAD, cls.EOS]:
      raise ValueError(f"{path} is not a moejax word vocabulary: it must start with "
                       f"{cls.PAD!r} and {cls.EOS!r} lines.")
    return cls([w for w in vocab[2:] if w])

  def serialize(self) -> str:
    """The vocabulary file: one word per line, line i holding id i."""
    return "\n".join(self._words) + "\n"

  @property
  def vocab_size(self) -> int:
    return len(self._words)

  @property
  def eos_id(self) -> int:
    return 1

  @property
  def pad_id(self) -> int:
    return PAD_ID

  def encode(self, text: str) -> list[int]:
    return [self._ids.get(w, self._unk_id) for w in text.split()]

  def decode(self, ids: Iterable[int]) -> str:
    return " ".join(self._words[i] for i in map(int, ids) if i > self.eos_id)
