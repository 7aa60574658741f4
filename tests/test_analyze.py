"""The expert-specialisation analysis (`python -m moejax.analyze`).

The statistics are checked on a hand-made batch of routing decisions against numbers counted by
hand (written out below), the token classes on hand-picked pieces, `MoeLayer.record_routing`
against the router's own choice, and the command end to end on a tiny run trained into a
temporary workdir on the PTB fixture.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments import switch_small
from moejax import analyze
from moejax import config as config_lib
from moejax import data as data_lib
from moejax import metrics, sharding, train, typed_config
from moejax.analysis import statistics, token_classes
from moejax.analysis.token_classes import sentencepiece_classes, word_classes
from moejax.data.tokenizer import WordTokenizer, train_sentencepiece
from moejax.moe import MoeConfig, MoeLayer
from moejax.routing import RouterConfig

# ----------------------------------------------------------------------------- statistics

# Eight real tokens, E = 3 experts, sequences of 4 positions, two MoE layers "a" and "b" (top-1).
TOKENS = np.array([5, 6, 5, 7, 5, 6, 8, 5])
POSITIONS = np.array([0, 1, 2, 3, 0, 1, 2, 3])
EXPERT_A = np.array([[0], [1], [0], [2], [0], [1], [2], [1]])
KEEP_A = np.array([[True]] * 7 + [[False]])  # the last token's assignment was dropped
EXPERT_B = np.array([[0], [2], [0], [2], [1], [1], [2], [0]])
KEEP_B = np.ones((8, 1), bool)
# Two classes over ids 0..8: "five" = {5}, "six_seven" = {6, 7}.
CLASSES_VC = np.zeros((9, 2), bool)
CLASSES_VC[5, 0] = True
CLASSES_VC[[6, 7], 1] = True


def test_assignment_and_position_counts_equal_a_recount():
  # Layer a: expert 0 gets tokens 0, 2, 4; expert 1 tokens 1, 5, 7; expert 2 tokens 3, 6.
  np.testing.assert_array_equal(statistics.expert_assignments(EXPERT_A, 3), [3, 3, 2])
  # Two buckets over 4 positions: positions 0-1 and 2-3.
  # expert 0: tokens 0, 4 (positions 0, 0) and 2 (position 2) -> [2, 1]
  # expert 1: tokens 1, 5 (positions 1, 1) and 7 (position 3) -> [2, 1]
  # expert 2: tokens 3, 6 (positions 3, 2)                      -> [0, 2]
  np.testing.assert_array_equal(statistics.load_by_position(EXPERT_A, POSITIONS, 3, 4, 2),
                                [[2, 1], [2, 1], [0, 2]])
  assert statistics.position_buckets(4, 2) == [(0, 2), (2, 4)]
  # 5 positions in 2 buckets: p * 2 // 5 puts 0, 1, 2 in bucket 0 and 3, 4 in bucket 1.
  assert statistics.position_buckets(5, 2) == [(0, 3), (3, 5)]
  np.testing.assert_array_equal(
      statistics.load_by_position(np.zeros((5, 1), int), np.arange(5), 1, 5, 2), [[3, 2]])
  # Top-2: each token counts once per assignment, so the counts sum to N * K.
  expert_NK = np.array([[0, 1], [1, 0], [1, 2]])
  np.testing.assert_array_equal(statistics.expert_assignments(expert_NK, 3), [2, 3, 1])
  np.testing.assert_array_equal(
      statistics.load_by_position(expert_NK, np.array([0, 1, 1]), 3, 2, 2),
      [[1, 1], [1, 2], [0, 1]])
  counts = statistics.token_expert_counts(np.array([3, 3, 4]), expert_NK, 3, 5)
  assert counts[3].tolist() == [2, 2, 0] and counts[4].tolist() == [0, 1, 1]
  assert counts.sum() == 6


def test_top_tokens_by_lift_equal_a_recount():
  counts = statistics.token_expert_counts(TOKENS, EXPERT_A, 3, 9)
  # Token 5 (4 of 8 tokens, P = 1/2): experts 0, 0, 0, 1. Token 6 (P = 2/8): expert 1 twice.
  # Tokens 7 and 8 (P = 1/8 each): expert 2.
  top = statistics.top_tokens(counts, min_count=1, top=5)
  lifts = [[(row["token"], row["count"], round(row["lift"], 6)) for row in rows] for rows in top]
  assert lifts == [
      [(5, 3, 2.0)],  # P(5 | e0) = 3/3, / (1/2)
      [(6, 2, round((2 / 3) / (2 / 8), 6)), (5, 1, round((1 / 3) / (1 / 2), 6))],
      [(7, 1, 4.0), (8, 1, 4.0)],  # (1/2) / (1/8); a tie in lift and count goes by id
  ]
  assert top[1][0]["expert_share"] == pytest.approx(2 / 3)
  assert top[1][0]["corpus_share"] == pytest.approx(2 / 8)
  # min_count=2 keeps the tokens an expert got at least twice.
  top = statistics.top_tokens(counts, min_count=2, top=5)
  assert [[row["token"] for row in rows] for rows in top] == [[5], [6], []]
  assert [len(rows) for rows in statistics.top_tokens(counts, min_count=1, top=1)] == [1, 1, 1]


def test_token_purity_equals_a_recount():
  # Token 5: experts 0, 0, 0, 1 (3 at its most frequent); 6: 1, 1 (2); 7: 2 (1); 8: 2 (1).
  counts = statistics.token_expert_counts(TOKENS, EXPERT_A, 3, 9)
  assert statistics.token_purity(counts) == (3 + 2 + 1 + 1) / 8


def test_class_shares_equal_a_recount():
  counts = statistics.token_expert_counts(TOKENS, EXPERT_A, 3, 9)
  shares, overall = statistics.class_shares(counts, CLASSES_VC)
  # expert 0: tokens 5, 5, 5; expert 1: 6, 6, 5; expert 2: 7, 8.
  np.testing.assert_allclose(shares, [[1.0, 0.0], [1 / 3, 2 / 3], [0.0, 1 / 2]])
  np.testing.assert_allclose(overall, [4 / 8, 3 / 8])  # token 5 four times; 6, 6, 7
  shares, _ = statistics.class_shares(np.array([[1, 0]]), np.array([[True]]))
  assert shares[0, 0] == 1.0 and np.isnan(shares[1, 0])  # an expert without tokens


def test_persistence_between_layers_equals_a_recount():
  # (a, b) per token: (0,0) (1,2) (0,0) (2,2) (0,1) (1,1) (2,2) (1,0): tokens 0, 2, 3, 5, 6 stay.
  out = statistics.persistence(EXPERT_A[:, 0], EXPERT_B[:, 0], 3)
  assert out["same"] == 5 and out["tokens"] == 8 and out["fraction"] == 5 / 8
  assert out["transitions"] == [[2, 1, 0], [1, 1, 1], [0, 0, 2]]
  # p_a = (3, 3, 2) / 8, p_b = (3, 2, 3) / 8: chance = (9 + 6 + 6) / 64.
  assert out["chance"] == pytest.approx(21 / 64)


def test_summary_of_two_layers():
  texts = [f"t{i}" for i in range(9)]
  result = statistics.summarise(TOKENS, POSITIONS, {"layer_1": (EXPERT_A, KEEP_A),
                                                    "layer_3": (EXPERT_B, KEEP_B)},
                                num_experts=3, seq_len=4, classes_VC=CLASSES_VC, texts=texts,
                                num_buckets=2, min_count=1, top=3)
  assert result["tokens"] == 8
  a = result["layers"]["layer_1"]
  assert a["expert_assignments"] == [3, 3, 2]
  assert a["dropped_tokens"] == 1 and a["dropped_assignments"] == [0, 1, 0]
  assert result["layers"]["layer_3"]["dropped_tokens"] == 0
  assert a["load_by_position"] == [[2, 1], [2, 1], [0, 2]]
  assert a["top_tokens"][0] == [{"token": 5, "count": 3, "expert_share": 1.0,
                                 "corpus_share": 0.5, "lift": 2.0, "text": "t5"}]
  assert a["class_shares_all"] == [0.5, 0.375]
  assert a["token_purity"] == 7 / 8
  assert [(p["from"], p["to"], p["same"]) for p in result["persistence"]] == [
      ("layer_1", "layer_3", 5)]
  json.dumps(result, allow_nan=False)  # JSON-ready


# ----------------------------------------------------------------------------- token classes


@pytest.mark.parametrize("piece, control, expected", [
    ("▁The", False, {"capitalised", "function_word", "word_initial"}),
    ("▁the", False, {"function_word", "word_initial"}),
    ("▁theory", False, {"word_initial"}),
    ("▁London", False, {"capitalised", "word_initial"}),
    ("ing", False, {"continuation"}),
    ("The", False, {"continuation"}),  # no space before it: not a capitalised word
    (",", False, {"punctuation", "continuation"}),
    ("▁,", False, {"punctuation", "word_initial"}),
    ("$", False, {"punctuation", "continuation"}),  # a symbol (category Sc)
    ("7", False, {"digits", "continuation"}),
    ("▁7", False, {"digits", "word_initial"}),
    ("▁", False, {"word_initial"}),
    ("<0x0A>", False, {"special"}),  # byte fallback
    ("<eos>", True, {"special"}),
])
def test_sentencepiece_piece_classes(piece, control, expected):
  assert sentencepiece_classes(piece, control=control) == expected


@pytest.mark.parametrize("word, control, expected", [
    ("the", False, {"function_word", "word_initial"}),
    ("company", False, {"word_initial"}),
    ("N", False, {"capitalised", "word_initial"}),  # PTB's number placeholder
    ("1990", False, {"digits", "word_initial"}),
    ("--", False, {"punctuation", "word_initial"}),
    ("'s", False, {"word_initial"}),
    ("<unk>", False, {"special"}),
    ("<eos>", True, {"special"}),
])
def test_word_classes(word, control, expected):
  assert word_classes(word, control=control) == expected


def test_vocabulary_of_the_word_tokenizer_with_a_mask_token():
  tokenizer = WordTokenizer(["the", ",", "N"])  # ids: <pad> <eos> the , N <unk>
  texts, classes = token_classes.vocabulary(tokenizer, 7, mask_id=6)
  assert texts == ["<pad>", "<eos>", "the", ",", "N", "<unk>", "<mask>"]
  named = [{token_classes.CLASSES[c] for c in np.flatnonzero(row)} for row in classes]
  assert named == [{"special"}, {"special"}, {"function_word", "word_initial"},
                   {"punctuation", "word_initial"}, {"capitalised", "word_initial"},
                   {"special"}, {"special"}]


def test_vocabulary_of_a_sentencepiece_model():
  text = "The cat sat on the mat, and the dog sat on the log in 1990.\n" * 40
  tokenizer = train_sentencepiece([text], vocab_size=290)
  texts, classes = token_classes.vocabulary(tokenizer, tokenizer.vocab_size)
  special = classes[:, token_classes.CLASSES.index("special")]
  assert special[:3].all()  # pad, unk, eos
  byte_ids = [i for i, t in enumerate(texts) if t.startswith("<0x")]
  assert len(byte_ids) == 256 and special[byte_ids].all()
  the = texts.index("▁the")
  assert classes[the, token_classes.CLASSES.index("function_word")]
  # Every other id is word-initial or a continuation, never both.
  initial = classes[:, token_classes.CLASSES.index("word_initial")]
  continuation = classes[:, token_classes.CLASSES.index("continuation")]
  assert np.array_equal(initial ^ continuation, ~special)


# ----------------------------------------------------------------------------- record_routing


def test_record_routing_returns_the_routers_choice_and_changes_nothing_else():
  M, S, E = 16, 8, 8
  config = MoeConfig(router=RouterConfig(kind="switch", num_experts=E, min_capacity=1),
                     ffn_dim=32, group_size=S)
  layer = MoeLayer(M, config, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((8, 16, M), np.float32))
  mask = jnp.asarray(rng.random((8, 16)) < 0.8)

  @nnx.jit
  def apply(layer, x, mask):
    return layer(x, padding_mask_BL=mask, train=False)

  y_off, aux_off = apply(layer, x, mask)
  assert aux_off.routing is None  # off by default
  layer.record_routing = True
  y_on, aux_on = apply(layer, x, mask)
  np.testing.assert_array_equal(y_on, y_off)
  for name in aux_off.metrics:
    np.testing.assert_array_equal(aux_on.metrics[name], aux_off.metrics[name])
  expert = np.asarray(aux_on.routing["expert_index_GSK"]).reshape(8 * 16)
  keep = np.asarray(aux_on.routing["keep_GSK"]).reshape(8 * 16)
  # Switch's choice is the arg max of the router logits x @ w, in token order.
  logits = np.asarray(x).reshape(-1, M) @ np.asarray(layer.router[...])
  np.testing.assert_array_equal(expert, logits.argmax(axis=-1))
  assert not keep[~np.asarray(mask).reshape(-1)].any()  # padding is never kept
  # The same decisions on a mesh of 8 devices (2 data rows x 4 expert shards).
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, expert=4))
  with jax.set_mesh(mesh):
    graphdef, state = nnx.split(layer)
    state = jax.device_put(state, sharding.shardings(state, mesh))
    tokens = NamedSharding(mesh, P(("data", "expert")))
    _, aux_mesh = apply(nnx.merge(graphdef, state), jax.device_put(x, tokens),
                        jax.device_put(mask, tokens))
  np.testing.assert_array_equal(np.asarray(aux_mesh.routing["expert_index_GSK"]).reshape(-1),
                                expert)
  np.testing.assert_array_equal(np.asarray(aux_mesh.routing["keep_GSK"]).reshape(-1), keep)


# ----------------------------------------------------------------------------- the command


def _tiny_run_config(data_dir):
  config = switch_small.get_config("tiny")
  config.data.name = "ptb"
  config.data.data_dir = data_dir
  config.model.moe_every = 1  # two MoE layers: blocks 0 and 1
  config.mesh.update(data=2, expert=4)
  config.train.update(num_steps=2, eval_batches=2)
  return config


def test_analyze_bad_input_is_one_line(tmp_path, capsys):
  assert analyze.main([f"--workdir={tmp_path}"]) == analyze.EXIT_USAGE
  err = capsys.readouterr().err.strip()
  assert err.startswith("moejax.analyze: --workdir=") and "config.json" in err
  assert len(err.splitlines()) == 1
  experiment = config_lib.experiment_config_from(switch_small.get_config("tiny"), num_devices=8)
  (tmp_path / "config.json").write_text(json.dumps(typed_config.as_plain(experiment)))
  assert analyze.main([f"--workdir={tmp_path}"]) == analyze.EXIT_USAGE
  err = capsys.readouterr().err.strip()
  assert "no checkpoint" in err and len(err.splitlines()) == 1


def test_analyze_refuses_routers_whose_tokens_do_not_choose(tmp_path, capsys):
  from experiments import expert_choice_small  # pylint: disable=g-import-not-at-top
  experiment = config_lib.experiment_config_from(expert_choice_small.get_config("tiny"),
                                                 num_devices=8)
  (tmp_path / "config.json").write_text(json.dumps(typed_config.as_plain(experiment)))
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)
  assert analyze.main([f"--workdir={tmp_path}"]) == analyze.EXIT_USAGE
  err = capsys.readouterr().err.strip()
  assert "model.moe.router.kind='expert_choice' is not analysed" in err
  assert len(err.splitlines()) == 1


@pytest.mark.slow
@pytest.mark.usefixtures("compile_once")
def test_analyze_a_trained_run_end_to_end(ptb_dir, tmp_path):
  workdir = tmp_path / "run"
  train.train_and_evaluate(_tiny_run_config(ptb_dir), workdir)
  out = tmp_path / "analysis"
  assert analyze.main([f"--workdir={workdir}", f"--out={out}", "--min-count=1"]) == 0
  result = json.loads((out / "analysis.json").read_text())
  names = {p.name for p in out.iterdir()}
  assert {"report.md", "analysis.json", "layer_0_load.png", "layer_1_load.png",
          "layer_0_classes.png", "layer_1_classes.png", "layer_0_to_layer_1.png"} <= names
  # The real tokens of the batches the run's evaluation read (train.eval_batches = 2).
  experiment = config_lib.experiment_config_from(_tiny_run_config(ptb_dir))
  tokenizer = data_lib.prepare(experiment.data)
  real = sum(int(batch["mask"].sum()) for batch in data_lib.eval_batches(
      experiment.data, tokenizer, batch_size=experiment.train.batch_size, max_batches=2))
  assert result["tokens"] == real > 0 and result["assignments_per_token"] == 1
  final = metrics.read_jsonl(workdir / "metrics.jsonl")[-1]
  assert final["eval/tokens"] == real
  assert list(result["layers"]) == ["layer_0", "layer_1"]
  for name, layer in result["layers"].items():
    assert sum(layer["expert_assignments"]) == real
    assert np.asarray(layer["load_by_position"]).sum(axis=1).tolist() == (
        layer["expert_assignments"])
    # The dropped tokens agree with the trainer's own evaluation of the same batches.
    assert layer["dropped_tokens"] / real == pytest.approx(
        final[f"eval/moe/{name}/dropped_fraction"], abs=1e-6)
    loads = [final[f"eval/moe/{name}/expert_load/{e}"] for e in range(8)]
    np.testing.assert_allclose(np.asarray(layer["expert_assignments"]) / real, loads,
                               atol=1e-6)
  assert result["persistence"][0]["tokens"] == real
  report = (out / "report.md").read_text()
  assert f"{real:,} real tokens" in report and "](layer_0_load.png)" in report
