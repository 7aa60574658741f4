"""How often each token id occurs in a split of a dataset, tokenized as the streams tokenize it.

    counts_V = count_tokens(config, tokenizer)      # the training split; int64 (V,)

Every document of the split is encoded with `tokenizer.encode` and followed by `eos_id`, exactly
the tokens `train_iterator` packs in one epoch (packing only cuts them into rows). Hash routing's
frequency-balanced table (`moejax.routing.hash_routing.balanced_table`, Roller et al. 2021) is
built from these counts of the training split.
"""

from __future__ import annotations

import numpy as np

from moejax.data.config import DataConfig
from moejax.data.pipeline import _data_source, _document_texts
from moejax.data.tokenizer import Tokenizer


def count_tokens(config: DataConfig, tokenizer: Tokenizer, split: str | None = None
                 ) -> np.ndarray:
  """int64 (V,): occurrences of each token id in `split` (default: `config.train_split`).

  V = `tokenizer.vocab_size`; one eos per document is counted. The dataset must be prepared
  (`moejax.data.prepare`).
  """
  source = _data_source(config, split or config.train_split)
  counts_V = np.zeros(tokenizer.vocab_size, np.int64)
  for text in _document_texts(source, config.text_key):
    ids = np.asarray(tokenizer.encode(text) + [tokenizer.eos_id], np.int64)
    counts_V += np.bincount(ids, minlength=tokenizer.vocab_size)
  return counts_V
