"""Token classes for the expert-specialisation analysis: what kind of text each vocabulary id is.

Every id of the model's vocabulary gets a set of classes, decided from its text alone (the piece
or word the tokenizer maps it to), never from its context. The classes overlap (a capitalised word
is also word-initial), so an expert's shares of them do not sum to 1.

Let `text` be the id's text with SentencePiece's word-start marker "▁" (U+2581) removed from its
front, and `initial` whether the id starts a word:

    special        not text: padding, end of document, SentencePiece's unknown piece and its
                   byte-fallback pieces (<0x00> ... <0xFF>), the masked LM's mask token, and ids
                   the tokenizer does not produce (a model vocabulary set larger than the
                   tokenizer's). A special id is in no other class.
    punctuation    `text` is non-empty and every character is Unicode punctuation or a symbol
                   (general category P* or S*): "," "." "--" "$" "%".
    digits         `text` is non-empty and every character is a decimal digit ("7"; SentencePiece
                   models in moejax split digits, so its digit pieces hold one digit each).
                   Penn Treebank writes every number as the word "N", which is not in this class.
    capitalised    `initial`, and the first character of `text` is an upper-case letter ("▁The",
                   "London"); Penn Treebank is lower-cased, so there it holds only "N".
    function_word  `initial`, and `text` lower-cased is one of FUNCTION_WORDS, the most frequent
                   English function words (articles, pronouns, prepositions, conjunctions,
                   auxiliaries). The class looks at the piece only: "▁the" also begins "theory"
                   when the tokenizer has no piece "▁theory".
    word_initial   the id starts a word. SentencePiece: the piece begins with "▁" (a space
                   precedes it in the text). Word tokenizer: every word (whole words only).
    continuation   the id continues the text without a space before it. SentencePiece: a piece
                   that does not begin with "▁": the inside or end of a word, punctuation
                   attached to a word ("," in "word,"), text after a line break. Word tokenizer:
                   none. Every non-special id is either word_initial or continuation.

Punctuation and digits are judged on `text`, so "▁," (a comma after a space) is punctuation and
word_initial.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import numpy as np
import sentencepiece as spm

from moejax.data.tokenizer import SentencePieceTokenizer, Tokenizer, WordTokenizer

CLASSES = ("special", "punctuation", "digits", "capitalised", "function_word", "word_initial",
           "continuation")
WORD_START = "\u2581"  # SentencePiece's "▁"
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")

FUNCTION_WORDS = frozenset("""
a an the this that these those
i me my he him his she her it its we us our you your they them their who whom which what
of in on at to for from by with about as into over under after before between through
and or but nor so if than because while
is are was were be been being am have has had do does did will would shall should can could
may might must not no
there here when where how all any some each other such only also then
""".split())


def piece_classes(text: str, *, initial: bool) -> frozenset[str]:
  """The non-special classes of an id whose text (word-start marker removed) is `text`."""
  out = {"word_initial" if initial else "continuation"}
  if text and all(unicodedata.category(c)[0] in "PS" for c in text):
    out.add("punctuation")
  if text and all(c.isdecimal() for c in text):
    out.add("digits")
  if initial and text and text[0].isupper():
    out.add("capitalised")
  if initial and text.lower() in FUNCTION_WORDS:
    out.add("function_word")
  return frozenset(out)


def sentencepiece_classes(piece: str, *, control: bool = False) -> frozenset[str]:
  """Classes of a SentencePiece piece; `control` for pad, unknown and end-of-document ids."""
  if control or _BYTE_PIECE.match(piece):
    return frozenset({"special"})
  initial = piece.startswith(WORD_START)
  return piece_classes(piece[1:] if initial else piece, initial=initial)


def word_classes(word: str, *, control: bool = False) -> frozenset[str]:
  """Classes of a word of the word tokenizer; `control` for pad and end of document."""
  if control or word == WordTokenizer.UNK:
    return frozenset({"special"})
  return piece_classes(word, initial=True)


def vocabulary(tokenizer: Tokenizer, vocab_size: int, *, mask_id: int | None = None
               ) -> tuple[list[str], np.ndarray]:
  """(text of every id, classes (V, len(CLASSES)) bool) for a model vocabulary of `vocab_size`.

  Ids from the tokenizer's size up (the masked LM's mask token `mask_id`, an explicitly larger
  vocabulary) are special, shown as "<mask>" and "<id N>".
  """
  texts, classes = [], []
  if isinstance(tokenizer, SentencePieceTokenizer):
    sp = spm.SentencePieceProcessor(model_proto=tokenizer.model_proto)
    for i in range(min(vocab_size, sp.get_piece_size())):
      piece = sp.id_to_piece(i)
      texts.append(piece)
      control = bool(sp.is_control(i) or sp.is_unknown(i))
      classes.append(sentencepiece_classes(piece, control=control))
  elif isinstance(tokenizer, WordTokenizer):
    for i in range(min(vocab_size, tokenizer.vocab_size)):
      control = i in (tokenizer.pad_id, tokenizer.eos_id)
      word = (WordTokenizer.PAD if i == tokenizer.pad_id else WordTokenizer.EOS if
              i == tokenizer.eos_id else tokenizer.decode([i]))
      texts.append(word)
      classes.append(word_classes(word, control=control))
  else:
    raise ValueError(f"no token classes for a {type(tokenizer).__name__}; the analysis knows the "
                     "SentencePiece and word tokenizers.")
  for i in range(len(texts), vocab_size):
    texts.append("<mask>" if i == mask_id else f"<id {i}>")
    classes.append(frozenset({"special"}))
  return texts, membership(classes)


def membership(classes: Sequence[frozenset[str]]) -> np.ndarray:
  """(V, len(CLASSES)) bool: id v is in class c."""
  out = np.zeros((len(classes), len(CLASSES)), bool)
  for v, names in enumerate(classes):
    for name in names:
      out[v, CLASSES.index(name)] = True
  return out
