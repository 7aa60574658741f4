"""The numbers of the expert-specialisation analysis, from routing decisions (numpy only).

Inputs, for N real tokens (padding already removed) and one MoE layer with E experts and K
assignments per token:

    tokens_N     int: the token id the model read at that position
    positions_N  int: its position in its sequence, in [0, seq_len)
    expert_NK    int: the expert of each of the token's K assignments (k = 0: the first choice)
    keep_NK      bool: that assignment was carried out (it fit in capacity)

Counting unit: an *assignment*, the router's choice before the capacity limit. A token counts
once per assignment (K times in all; once for top-1), whether or not it was carried out (capacity,
GShard's second-expert policy), so the numbers describe what the router prefers; how many were
not carried out is counted apart (`dropped_tokens`: tokens none of whose assignments was carried
out; `dropped_assignments`: per expert).

    expert_assignments_E    assignments per expert (sums to N * K)
    load_by_position_EP     assignments per expert and position bucket (P buckets of equal width
                            over [0, seq_len); bucket of position p: p * P // seq_len)
    token_expert_counts_VE  assignments per (token id, expert)
    top_tokens              per expert, the tokens most over-represented in it: lift =
                            P(token | expert) / P(token), where P(token | expert) =
                            count(token, expert) / count(expert) and P(token) =
                            count(token) / (N * K), over the analysed tokens; only tokens with
                            count(token, expert) >= min_count
    token_purity            the share of assignments that go to their token id's most frequent
                            expert: 1.0 when the expert is a function of the token id alone,
                            1/E when routing ignores the token id (in a uniform way)
    class_shares_EC         per expert, the share of its assignments whose token is in each class
                            (token_classes.py); the same over all assignments is the baseline
    persistence             between two MoE layers: how often a token's first choice in the later
                            layer has the same expert index as in the earlier one, with the rate
                            expected if the two choices were independent, sum_e p1(e) p2(e)
"""

from __future__ import annotations

from typing import Any

import numpy as np


def expert_assignments(expert_NK: np.ndarray, num_experts: int) -> np.ndarray:
  """(E,) int64: assignments per expert."""
  return np.bincount(np.asarray(expert_NK).reshape(-1), minlength=num_experts)


def position_buckets(seq_len: int, num_buckets: int) -> list[tuple[int, int]]:
  """[start, end) of each position bucket (those of `load_by_position`)."""
  num_buckets = min(num_buckets, seq_len)
  bounds = [-(-b * seq_len // num_buckets) for b in range(num_buckets + 1)]  # ceil(b*L/P)
  return [(bounds[b], bounds[b + 1]) for b in range(num_buckets)]


def load_by_position(expert_NK: np.ndarray, positions_N: np.ndarray, num_experts: int,
                     seq_len: int, num_buckets: int) -> np.ndarray:
  """(E, P) int64: assignments per expert and position bucket (bucket p * P // seq_len)."""
  num_buckets = min(num_buckets, seq_len)
  expert_NK = np.asarray(expert_NK)
  bucket_N = np.asarray(positions_N) * num_buckets // seq_len
  bucket_NK = np.broadcast_to(bucket_N[:, None], expert_NK.shape)
  flat = expert_NK.reshape(-1) * num_buckets + bucket_NK.reshape(-1)
  return np.bincount(flat, minlength=num_experts * num_buckets).reshape(num_experts, num_buckets)


def token_expert_counts(tokens_N: np.ndarray, expert_NK: np.ndarray, num_experts: int,
                        vocab_size: int) -> np.ndarray:
  """(V, E) int64: assignments per token id and expert."""
  expert_NK = np.asarray(expert_NK)
  tokens_NK = np.broadcast_to(np.asarray(tokens_N)[:, None], expert_NK.shape)
  flat = tokens_NK.reshape(-1) * num_experts + expert_NK.reshape(-1)
  return np.bincount(flat, minlength=vocab_size * num_experts).reshape(vocab_size, num_experts)


def top_tokens(counts_VE: np.ndarray, *, min_count: int, top: int) -> list[list[dict[str, Any]]]:
  """Per expert, up to `top` tokens by lift (then count, then id) among those it got at least
  `min_count` times: dicts of token, count, expert_share P(t|e), corpus_share P(t), lift."""
  counts_VE = np.asarray(counts_VE, np.int64)
  total = counts_VE.sum()
  token_V = counts_VE.sum(axis=1)
  out = []
  for e in range(counts_VE.shape[1]):
    column = counts_VE[:, e]
    expert_total = column.sum()
    candidates = np.flatnonzero(column >= max(min_count, 1))
    rows = []
    for v in candidates:
      expert_share = column[v] / expert_total
      corpus_share = token_V[v] / total
      rows.append({"token": int(v), "count": int(column[v]), "expert_share": float(expert_share),
                   "corpus_share": float(corpus_share),
                   "lift": float(expert_share / corpus_share)})
    rows.sort(key=lambda r: (-r["lift"], -r["count"], r["token"]))
    out.append(rows[:top])
  return out


def token_purity(counts_VE: np.ndarray) -> float:
  """Share of the assignments that go to their token id's most frequent expert."""
  counts_VE = np.asarray(counts_VE)
  total = counts_VE.sum()
  return float(counts_VE.max(axis=1).sum() / total) if total else float("nan")


def class_shares(counts_VE: np.ndarray, classes_VC: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
  """((E, C) share of each expert's assignments in each class, (C,) the share over all).

  An expert without assignments has NaN shares.
  """
  counts_VE = np.asarray(counts_VE, np.float64)
  in_class_EC = counts_VE.T @ np.asarray(classes_VC, np.float64)
  per_expert_E = counts_VE.sum(axis=0)
  with np.errstate(invalid="ignore", divide="ignore"):
    shares_EC = in_class_EC / per_expert_E[:, None]
  overall_C = in_class_EC.sum(axis=0) / max(per_expert_E.sum(), 1.0)
  return shares_EC, overall_C


def persistence(first_N: np.ndarray, next_N: np.ndarray, num_experts: int) -> dict[str, Any]:
  """How often the first choice stays at the same expert index from one layer to the next.

  Returns transitions (E, E) int (row: expert in the first layer, column: in the next), same
  (tokens that keep their expert index), fraction = same / N and chance = sum_e p1(e) p2(e).
  """
  first_N, next_N = np.asarray(first_N), np.asarray(next_N)
  n = first_N.shape[0]
  transitions = np.bincount(first_N * num_experts + next_N,
                            minlength=num_experts * num_experts).reshape(num_experts, num_experts)
  same = int(np.trace(transitions))
  p1 = transitions.sum(axis=1) / max(n, 1)
  p2 = transitions.sum(axis=0) / max(n, 1)
  return {"transitions": transitions.tolist(), "same": same, "tokens": int(n),
          "fraction": same / n if n else float("nan"), "chance": float(np.dot(p1, p2))}


def layer_statistics(tokens_N: np.ndarray, positions_N: np.ndarray, expert_NK: np.ndarray,
                     keep_NK: np.ndarray, *, num_experts: int, vocab_size: int, seq_len: int,
                     classes_VC: np.ndarray, num_buckets: int, min_count: int, top: int
                     ) -> dict[str, Any]:
  """Everything the report shows about one MoE layer, JSON-ready (see the module docstring)."""
  keep_NK = np.asarray(keep_NK, bool)
  counts_VE = token_expert_counts(tokens_N, expert_NK, num_experts, vocab_size)
  shares_EC, overall_C = class_shares(counts_VE, classes_VC)
  dropped_E = np.bincount(np.asarray(expert_NK)[~keep_NK], minlength=num_experts)
  return {
      "expert_assignments": expert_assignments(expert_NK, num_experts).tolist(),
      "dropped_assignments": dropped_E.tolist(),
      "dropped_tokens": int(np.sum(~keep_NK.any(axis=1))),
      "load_by_position": load_by_position(expert_NK, positions_N, num_experts, seq_len,
                                           num_buckets).tolist(),
      "top_tokens": top_tokens(counts_VE, min_count=min_count, top=top),
      "token_purity": token_purity(counts_VE),
      "class_shares": [[_finite_or_none(x) for x in row] for row in shares_EC],
      "class_shares_all": [float(x) for x in overall_C],
  }


def summarise(tokens_N: np.ndarray, positions_N: np.ndarray,
              layers: dict[str, tuple[np.ndarray, np.ndarray]], *, num_experts: int,
              seq_len: int, classes_VC: np.ndarray, texts: list[str], num_buckets: int = 16,
              min_count: int = 5, top: int = 20) -> dict[str, Any]:
  """Every layer's statistics and the persistence between consecutive layers, JSON-ready.

  `layers` maps each MoE layer's name, in block order, to (expert_NK, keep_NK); `classes_VC` and
  `texts` describe the V ids of the vocabulary (token_classes.vocabulary). Top tokens carry their
  text.
  """
  vocab_size = len(texts)
  out_layers = {}
  for name, (expert_NK, keep_NK) in layers.items():
    stats = layer_statistics(tokens_N, positions_N, expert_NK, keep_NK, num_experts=num_experts,
                             vocab_size=vocab_size, seq_len=seq_len, classes_VC=classes_VC,
                             num_buckets=num_buckets, min_count=min_count, top=top)
    for rows in stats["top_tokens"]:
      for row in rows:
        row["text"] = texts[row["token"]]
    out_layers[name] = stats
  names = list(layers)
  pairs = []
  for first, second in zip(names, names[1:]):
    pairs.append({"from": first, "to": second,
                  **persistence(layers[first][0][:, 0], layers[second][0][:, 0], num_experts)})
  return {"tokens": int(np.asarray(tokens_N).shape[0]),
          "position_buckets": [list(b) for b in position_buckets(seq_len, num_buckets)],
          "min_count": min_count, "layers": out_layers, "persistence": pairs}


def _finite_or_none(x: float) -> float | None:
  return float(x) if np.isfinite(x) else None
