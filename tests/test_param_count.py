"""Parameter counts (total, embedding, active per token) against hand counts of tiny models."""

import pytest
from flax import nnx

from experiments import dense_small, switch_small
from moejax.model import Transformer, model_config_from, num_params
from moejax.param_count import ParamCount, count_params


def _count(config, k):
  model_config = model_config_from(config.model, vocab_size=100)
  model = nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0)))
  return count_params(nnx.state(model, nnx.Param), experts_per_token=k), num_params(model)


# The tiny variant: V=100, M=32, 2 blocks of attention H=2 x D=16, F=64; block 1 of switch_small
# is an MoE layer of E=8 experts of width 64.
ATTENTION = 4 * 32 * 2 * 16  # wq, wk, wv (M, H, D) and wo (H, D, M)
NORMS = 2 * 32  # the two RMSNorm scales of a block
DENSE_FFN = 2 * 32 * 64  # wi (M, F), wo (F, M)
ROUTER = 32 * 8  # (M, E)
EXPERTS = 8 * 2 * 32 * 64  # wi (E, M, F), wo (E, F, M)
EMBEDDING = 100 * 32  # (V, M)
FINAL_NORM = 32
BLOCKS_WITHOUT_FFN = 2 * (ATTENTION + NORMS)


@pytest.mark.parametrize("k", [1, 2])
def test_moe_model_counts_the_router_and_k_of_e_experts_as_active(k):
  config = switch_small.get_config("tiny")
  if k == 2:
    config.model.moe.router.update(kind="topk", k=2)
  counts, every_param = _count(config, k)
  non_expert = BLOCKS_WITHOUT_FFN + DENSE_FFN + ROUTER + FINAL_NORM
  assert counts == ParamCount(total=EMBEDDING + non_expert + EXPERTS, embedding=EMBEDDING,
                              active=non_expert + EXPERTS * k // 8)
  assert (counts.total, counts.active) == (48_672, 16_800 + 4_096 * (k - 1))
  assert counts.total == every_param


def test_untied_output_projection_counts_as_embedding():
  config = switch_small.get_config("tiny")
  config.model.tie_embeddings = False
  counts, every_param = _count(config, 1)
  assert counts.embedding == 2 * EMBEDDING  # (V, M) and (M, V)
  assert counts.total == every_param == 48_672 + EMBEDDING
  assert counts.active == 16_800


def test_dense_model_is_all_active():
  counts, every_param = _count(dense_small.get_config("tiny"), 1)
  non_embedding = BLOCKS_WITHOUT_FFN + 2 * DENSE_FFN + FINAL_NORM
  assert counts == ParamCount(total=EMBEDDING + non_embedding, embedding=EMBEDDING,
                              active=non_embedding)
  assert every_param == counts.total


def test_counts_as_metrics_and_one_line():
  counts = ParamCount(total=48_672, embedding=3_200, active=16_800)
  assert counts.as_metrics() == {"model/params_total": 48_672.0,
                                 "model/params_embedding": 3_200.0,
                                 "model/params_active_per_token": 16_800.0}
  assert counts.describe().startswith("parameters: 48,672 total, 3,200 of them embedding; "
                                      "active per token: 16,800 (without the embedding")
