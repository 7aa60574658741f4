"""moejax's input pipeline: TFDS builders for offline text, tokenizers, grain streams.

    config = data_config_from(cfg.data)          # or DataConfig(name="ptb", seq_len=64, ...)
    tokenizer = prepare(config)                  # builds dataset + tokenizer once, then loads
    it = train_iterator(config, tokenizer, batch_size=8,
                        process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it)                             # {"inputs", "targets": (8, L) int32, "mask": bool}
    for batch in eval_batches(config, tokenizer, batch_size=8, max_batches=50): ...

Modules: `config` (DataConfig), `corpora` (TFDS builders `moejax_public_domain` and `ptb`),
`tokenizer` (SentencePiece and word tokenizers), `pipeline` (prepare and the grain streams),
`token_counts` (token id frequencies of a split, for hash routing's balanced table).
"""

from moejax.data.config import DataConfig, data_config_from
from moejax.data.corpora import MoejaxPublicDomain, Ptb
from moejax.data.pipeline import eval_batches, prepare, tokenizer_path, train_iterator
from moejax.data.token_counts import count_tokens
from moejax.data.tokenizer import (
    SentencePieceTokenizer,
    Tokenizer,
    WordTokenizer,
    train_sentencepiece,
)

__all__ = [
    "DataConfig",
    "MoejaxPublicDomain",
    "Ptb",
    "SentencePieceTokenizer",
    "Tokenizer",
    "WordTokenizer",
    "count_tokens",
    "data_config_from",
    "eval_batches",
    "prepare",
    "tokenizer_path",
    "train_iterator",
    "train_sentencepiece",
]
