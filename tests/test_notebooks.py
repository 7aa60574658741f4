"""Executes every notebook under notebooks/ and checks values the notebooks print.

The routing walkthrough's decisions are recomputed here with numpy from the same hand-written
inputs (router logits, noise, uniform numbers, token ids), written out again below: each router
family's formula and the capacity claim as plain loops, independent of moejax.

Each notebook runs in a fresh ipykernel of the current Python (the native kernel spec, whatever
kernel specs are installed elsewhere), with the repository root as working directory and first on
PYTHONPATH, so it imports this checkout's moejax. The kernel is a separate process that does not
see conftest's 8 simulated devices: it gets JAX_PLATFORMS=cpu and XLA_FLAGS without the device
count, i.e. one CPU device, as when a notebook is opened on its own. Any cell error fails the test.

The reproduction notebook reads the committed study results (docs/studies); it is executed on them
and on the fixture report tests/fixtures/studies/tiny.json (made by running that tiny study), and
what it prints is checked against the JSON files.
"""

import ast
import functools
import json
import math
import os
import pathlib
import re
import sys

import nbformat
import numpy as np
import pytest
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

import study_cells

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300


def _kernel_env() -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if "xla_force_host_platform_device_count" not in f]
  if flags:
    env["XLA_FLAGS"] = " ".join(flags)
  else:
    env.pop("XLA_FLAGS", None)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
  return env


@functools.cache
def _execute(path: pathlib.Path, **extra_env: str):
  """The notebook at `path`, executed (once per test session and environment); raises on any
  cell error. `extra_env` is added to the kernel's environment."""
  nb = nbformat.read(path, as_version=4)
  # No kernel directories: the spec manager falls back to ipykernel's native spec, whose command
  # is this interpreter (sys.executable).
  km = KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
  assert km.kernel_spec.argv[0] == sys.executable, km.kernel_spec.argv
  client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, record_timing=False,
                          resources={"metadata": {"path": str(REPO)}})
  client.execute(env={**_kernel_env(), **extra_env})
  return nb


def _stdout(nb) -> str:
  return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                 for out in cell.get("outputs", []) if out.get("name") == "stdout")


def test_notebooks_directory_holds_the_routing_walkthrough():
  assert REPO / "notebooks" / "routing_walkthrough.ipynb" in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_saved_executed(path):
  nb = nbformat.read(path, as_version=4)
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert code and all(cell.execution_count is not None for cell in code), (
      f"{path.name} is saved without outputs; re-execute it (see README, Notebooks).")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes_without_errors(path):
  nb = _execute(path)
  errors = [out for cell in nb.cells for out in cell.get("outputs", [])
            if out.get("output_type") == "error"]
  assert not errors


def _float(pattern: str, text: str) -> float:
  match = re.search(pattern, text)
  assert match, f"no line matches {pattern!r}"
  return float(match.group(1))


def test_routing_walkthrough_printed_values():
  text = _stdout(_execute(REPO / "notebooks" / "routing_walkthrough.ipynb"))
  # Capacity C = ceil(k * capacity_factor * S / E) with S=8, E=4, factor 1.0.
  for k, capacity in [(1, 2), (2, 4), (3, 6)]:
    assert f"C = ceil({k} * 1.0 * 8 / 4) = {capacity}" in text
  # Who is dropped: token 3 by position; token 1 by priority; nobody once token 0 is padding.
  for line in ["Switch top-1: dropped tokens [3]", "GShard top-2: dropped tokens []",
               "padding: dropped tokens []", "batch-prioritized: dropped tokens [1]"]:
    assert line in text
  # The library's losses against the notebook's float64 numpy recomputation.
  for name, expected in [("load-balancing loss", 1.065441), ("router z-loss", 6.231639)]:
    library = _float(rf"{name}: moejax (\S+)", text)
    by_hand = _float(rf"{name}: moejax \S+  numpy (\S+)", text)
    difference = _float(rf"{name}: .*\|difference\| (\S+)", text)
    assert difference <= 1e-6, name
    assert library == pytest.approx(expected, abs=1e-5), name
    assert by_hand == pytest.approx(expected, abs=1e-5), name
  assert "buffers equal: True" in text
  assert _float(r"einsum vs index: max \|y difference\| (\S+)", text) <= 1e-5
  assert re.search(r"einsum vs index: .*allclose: True", text)



# The walkthrough's inputs: one group of S = 8 tokens, E = 4 experts.
LOGITS_SE = np.array([
    [2.0, 0.5, 0.0, -1.0], [1.5, 1.0, -0.5, 0.0], [0.0, 2.5, 0.5, 0.0], [3.0, 0.0, 1.0, -0.5],
    [0.0, 0.0, 2.0, 1.0], [-1.0, 1.0, 0.0, 2.0], [0.5, 0.0, 0.0, 1.5], [0.0, 1.5, 1.0, 0.5]])
NOISE_SE = np.array([
    [0.3, -0.5, 1.2, 0.1], [-1.0, 0.4, 0.0, 0.8], [0.2, -0.3, 0.9, -1.1], [0.5, 0.0, -0.7, 0.3],
    [-0.4, 1.6, -0.2, 0.0], [0.1, -0.8, 0.6, -0.3], [0.7, 0.2, -1.3, 0.4], [-0.6, 0.1, 0.7, 0.8]])
UNIFORM_SE = np.array([
    [0.12, 0.85, 0.40, 0.33], [0.51, 0.07, 0.28, 0.93], [0.77, 0.31, 0.64, 0.05],
    [0.22, 0.46, 0.91, 0.58], [0.36, 0.19, 0.72, 0.44], [0.95, 0.62, 0.13, 0.27],
    [0.48, 0.55, 0.09, 0.81], [0.68, 0.74, 0.35, 0.16]])
TOKEN_IDS = [0, 1, 2, 3, 0, 4, 0, 5]  # the cat sat on the mat the end
S, E = LOGITS_SE.shape
WEIGHT_ATOL = 6e-4  # weights are printed to 3 decimals


def _walkthrough() -> str:
  return _stdout(_execute(REPO / "notebooks" / "routing_walkthrough.ipynb"))


def _softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _top(scores_SE, k):
  """Each row's k largest entries, best first (ties: the lower index)."""
  return [[int(e) for e in np.argsort(-row, kind="stable")[:k]] for row in scores_SE]


def _claim(choices, capacity, *, choice_major=False):
  """The kept experts of each token, at most `capacity` tokens per expert.

  Assignments claim slots one after another; one past its expert's capacity is dropped. The
  order: token by token in position order, each token's choices in preference order (the default,
  `claim_order="position"`); with `choice_major`, every token's first choice (tokens in position
  order), then every second choice, ... (GShard's Algorithm 1, `claim_order="choice"`).
  """
  order = [(s, k) for s, c in enumerate(choices) for k in range(len(c))]
  if choice_major:
    order.sort(key=lambda sk: (sk[1], sk[0]))
  count = [0] * E
  keep = [[False] * len(c) for c in choices]
  for s, k in order:
    expert = choices[s][k]
    if count[expert] < capacity:
      count[expert] += 1
      keep[s][k] = True
  return [[e for e, kept in zip(c, keep[s]) if kept] for s, c in enumerate(choices)]


def _weights(kept, weight_of):
  return [[weight_of(s, e) for e in experts] for s, experts in enumerate(kept)]


def _printed_list(line_start: str, text: str):
  match = re.search(rf"^{re.escape(line_start)} (.*)$", text, re.M)
  assert match, f"no line starts with {line_start!r}"
  return ast.literal_eval(match.group(1))


def _matrix(title: str, text: str, rows: int) -> np.ndarray:
  """The `rows` lines numpy printed after the line starting with `title`."""
  lines = text.splitlines()
  start = next((i for i, line in enumerate(lines) if line.startswith(title)), None)
  assert start is not None, f"no line starts with {title!r}"
  values = [[float(v) for v in re.findall(r"-?\d+\.?\d*(?:e-?\d+)?", line)]
            for line in lines[start + 1:start + 1 + rows]]
  return np.array(values)


def _assert_decision(label: str, text: str, kept, weights):
  assert _printed_list(f"{label} experts:", text) == kept, label
  printed = _printed_list(f"{label} weights:", text)
  assert [len(w) for w in printed] == [len(w) for w in weights], label
  np.testing.assert_allclose(sum(printed, []), sum(weights, []), atol=WEIGHT_ATOL, err_msg=label)


def _noisy_topk():
  """Top 2 of H = logits + noise (std 1), weights softmax over the kept two; C = 4."""
  noisy_SE = LOGITS_SE + NOISE_SE
  choices = _top(noisy_SE, 2)
  gates = [dict(zip(c, _softmax(noisy_SE[s, c]))) for s, c in enumerate(choices)]
  return choices, _claim(choices, 4), gates


def _sinkhorn_balanced(iterations=10, tolerance=1e-3):
  """Columns rescaled to N / E = 2, rows to 1, until the columns are within tolerance."""
  balanced_SE = _softmax(LOGITS_SE)
  for rounds in range(1, iterations + 1):
    balanced_SE = balanced_SE * (S / E / balanced_SE.sum(axis=0))
    balanced_SE = balanced_SE / balanced_SE.sum(axis=1, keepdims=True)
    if np.max(np.abs(balanced_SE.sum(axis=0) / (S / E) - 1)) <= tolerance:
      break
  return balanced_SE, rounds


def _deepseek_grouped():
  """Sigmoid affinities; the better of groups {0, 1} and {2, 3} by summed affinity; both of its
  experts, best first."""
  s_SE = _sigmoid(LOGITS_SE)
  choices = []
  for row in s_SE:
    group = 0 if row[:2].sum() >= row[2:].sum() else 1
    experts = [2 * group, 2 * group + 1]
    choices.append(sorted(experts, key=lambda e: -row[e]))
  return choices


def _expert_choice_picks(logits_SE, capacity=2):
  """Expert e -> its `capacity` tokens of highest softmax affinity, best first."""
  probs_SE = _softmax(logits_SE)
  return {e: [int(s) for s in np.argsort(-probs_SE[:, e], kind="stable")[:capacity]]
          for e in range(E)}


def _mix32(h: int) -> int:
  h ^= h >> 16
  h = (h * 0x85EBCA6B) & 0xFFFFFFFF
  h ^= h >> 13
  h = (h * 0xC2B2AE35) & 0xFFFFFFFF
  return h ^ (h >> 16)


def test_walkthrough_inputs_are_the_hand_written_ones():
  text = _walkthrough()
  np.testing.assert_allclose(_matrix("softmax probabilities", text, S), _softmax(LOGITS_SE),
                             atol=WEIGHT_ATOL)
  np.testing.assert_allclose(_matrix("H(x) = logits + 1.0 * noise", text, S),
                             LOGITS_SE + NOISE_SE, atol=1e-6)


def test_gshard_claim_orders():
  """Position order (the default) against GShard's choice order, on the same top-2 choices."""
  text = _walkthrough()
  probs_SE = _softmax(LOGITS_SE)
  choices = _top(probs_SE, 2)
  renormalised = lambda s, e: probs_SE[s, e] / probs_SE[s, choices[s]].sum()
  by_position = _claim(choices, 4)
  by_choice = _claim(choices, 4, choice_major=True)
  for label, kept in [("gshard position order", by_position), ("gshard choice order", by_choice)]:
    _assert_decision(label, text, kept, _weights(kept, renormalised))
  # Expert 1's 4 slots: tokens 0, 1, 2 and 5 in position order; in choice order token 7's first
  # choice comes before token 5's second.
  differ = [(s, k, e, e in by_position[s], e in by_choice[s]) for s, c in enumerate(choices)
            for k, e in enumerate(c) if (e in by_position[s]) != (e in by_choice[s])]
  assert differ == [(5, 1, 1, True, False), (7, 0, 1, False, True)]
  printed = re.findall(r"^differs: token (\d+) choice (\d+) \(expert (\d+)\): kept in position "
                       r"order (True|False), in choice order (True|False)$", text, re.M)
  assert printed == [tuple(str(v) for v in row) for row in differ]
  assert "GShard choice order: dropped tokens []" in text
  assert "causal in training: position order True, choice order False" in text


def test_noisy_topk_decision_and_losses():
  text = _walkthrough()
  choices, kept, gates = _noisy_topk()
  _assert_decision("noisy_topk train", text, kept, _weights(kept, lambda s, e: gates[s][e]))
  probs_SE = _softmax(LOGITS_SE)
  clean = _top(LOGITS_SE, 2)  # evaluation: no noise; C = ceil(2 * 2.0 * 8 / 4) = 8
  _assert_decision("noisy_topk eval", text, clean,
                   _weights(clean, lambda s, e: probs_SE[s, e] / probs_SE[s, clean[s]].sum()))
  # Importance: the gates before capacity summed per expert. Load: sum over tokens of
  # Phi((clean logit - threshold) / 1), the threshold the k-th largest noisy logit of the others.
  cv2 = lambda x: np.var(x) / np.mean(x) ** 2
  importance_E = np.zeros(E)
  for s, gate in enumerate(gates):
    for e, g in gate.items():
      importance_E[e] += g
  noisy_SE = LOGITS_SE + NOISE_SE
  load_E = np.zeros(E)
  for s in range(S):
    for e in range(E):
      others = np.sort(np.delete(noisy_SE[s], e))[::-1]
      threshold = others[1]  # k = 2: the 2nd largest of the other experts' noisy logits
      load_E[e] += 0.5 * (1 + math.erf((LOGITS_SE[s, e] - threshold) / math.sqrt(2)))
  for name, expected in [("importance_loss", cv2(importance_E)), ("load_loss", cv2(load_E))]:
    assert _float(rf"noisy_topk {name}: (\S+)", text) == pytest.approx(expected, rel=1e-4), name


def test_random_decision_in_training_and_evaluation():
  text = _walkthrough()
  train = _claim(_top(UNIFORM_SE, 1), 2)
  assert train == [[1], [3], [0], [2], [2], [0], [3], [1]]
  _assert_decision("random train", text, train, _weights(train, lambda s, e: 1.0))
  # Evaluation: u(s, e) = mix32((s * E + e) xor seed), top 24 bits; C = ceil(2.0 * 8 / 4) = 4.
  fixed_SE = np.array([[(_mix32((s * E + e) ^ 0x9E3779B9) >> 8) / 2 ** 24 for e in range(E)]
                       for s in range(S)])
  evaluation = _claim(_top(fixed_SE, 1), 4)
  _assert_decision("random eval", text, evaluation, _weights(evaluation, lambda s, e: 1.0))


def test_hash_decision_from_the_balanced_table():
  text = _walkthrough()
  # Counts: the 3, the other five words 1. Greedy: "the" -> expert 0, then cat, sat, on -> 1, 2, 3
  # (the empty experts, lowest index first), mat -> 1 and end -> 2 (1 token each, fewest ids).
  table = [0, 1, 2, 3, 1, 2]
  assert "balanced table: [0 1 2 3 1 2]" in text
  kept = _claim([[table[t]] for t in TOKEN_IDS], 2)  # the third "the" (token 6) overflows
  assert kept[6] == []
  _assert_decision("hash", text, kept, _weights(kept, lambda s, e: 1.0))
  assert "hash: dropped tokens [6]" in text


def test_sinkhorn_decision_in_training_and_evaluation():
  text = _walkthrough()
  balanced_SE, rounds = _sinkhorn_balanced()
  assert f"balanced scores after {rounds} rounds" in text
  np.testing.assert_allclose(_matrix("balanced scores after", text, S), balanced_SE,
                             atol=WEIGHT_ATOL)
  probs_SE = _softmax(LOGITS_SE)
  renormalised = lambda choices: lambda s, e: probs_SE[s, e] / probs_SE[s, choices[s]].sum()
  choices = _top(balanced_SE, 2)
  assert choices[6] == [3, 2] and _top(probs_SE, 2)[6] == [3, 0]
  kept = _claim(choices, 4)
  _assert_decision("sinkhorn train", text, kept, _weights(kept, renormalised(choices)))
  evaluation = _top(probs_SE, 2)  # C = 8: nothing overflows
  _assert_decision("sinkhorn eval", text, evaluation, _weights(evaluation, renormalised(evaluation)))


def test_deepseek_groups_and_balancing_bias():
  text = _walkthrough()
  s_SE = _sigmoid(LOGITS_SE)
  scaled = lambda choices: lambda s, e: 2.5 * s_SE[s, e] / s_SE[s, choices[s]].sum()
  grouped = _deepseek_grouped()
  assert grouped[7] == [2, 3] and _top(s_SE, 2)[7] == [1, 2]
  for label, choices in [("deepseek groups", grouped), ("deepseek no groups", _top(s_SE, 2))]:
    kept = _claim(choices, 4)  # weights normalised over the chosen 2, before capacity
    _assert_decision(label, text, kept, _weights(kept, scaled(choices)))
  # Top-1 by affinity, then one bias step at rate 0.1 from the load: 0.1 * sign(mean - load).
  before = _top(s_SE, 1)
  load_E = np.bincount(sum(before, []), minlength=E)
  bias_E = 0.1 * np.sign(load_E.mean() - load_E)
  after = _top(s_SE + bias_E, 1)
  assert after == [[0], [1], [1], [0], [2], [3], [3], [2]]
  affinity = lambda s, e: s_SE[s, e]  # weights never see the bias
  _assert_decision("deepseek before bias", text, _claim(before, 2),
                   _weights(_claim(before, 2), affinity))
  _assert_decision("deepseek after bias", text, _claim(after, 2),
                   _weights(_claim(after, 2), affinity))
  max_vio = lambda load: load.max() / load.mean() - 1
  assert _float(r"MaxVio before bias: (\S+)", text) == pytest.approx(max_vio(load_E), abs=1e-3)
  after_load = np.bincount(sum(after, []), minlength=E)
  assert _float(r"MaxVio after bias: (\S+)", text) == pytest.approx(max_vio(after_load), abs=1e-3)


def test_expert_choice_picks_and_causality():
  text = _walkthrough()
  picks = _expert_choice_picks(LOGITS_SE)
  assert _printed_list("expert_choice picks:", text) == picks
  kept = [[e for e in range(E) if s in picks[e]] for s in range(S)]
  probs_SE = _softmax(LOGITS_SE)
  _assert_decision("expert_choice", text, kept, _weights(kept, lambda s, e: probs_SE[s, e]))
  later_SE = LOGITS_SE.copy()
  later_SE[7] = [4.0, 1.5, 1.0, 0.5]
  later = _expert_choice_picks(later_SE)
  assert _printed_list("expert_choice picks, token 7 changed:", text) == later
  assert 0 in picks[0] and not any(0 in tokens for tokens in later.values())
  assert "expert_choice token 0 reaches: [0] -> []" in text
  assert "switch token 0 reaches: [0] -> [0]" in text


def test_soft_dispatch_and_combine_weights():
  text = _walkthrough()
  np.testing.assert_allclose(_matrix("soft dispatch D", text, S), _softmax(LOGITS_SE, axis=0),
                             atol=WEIGHT_ATOL)
  np.testing.assert_allclose(_matrix("soft combine C", text, S), _softmax(LOGITS_SE, axis=1),
                             atol=WEIGHT_ATOL)
  assert "index dispatch: model.moe.dispatch='index' cannot execute" in text


def _reference_assignments():
  """Router -> (assignments before capacity, kept assignments, C), each a list per token."""
  probs_SE = _softmax(LOGITS_SE)
  token_choice = {
      "switch": (_top(probs_SE, 1), 2), "gshard": (_top(probs_SE, 2), 4),
      "topk k=3": (_top(probs_SE, 3), 6), "noisy_topk": (_noisy_topk()[0], 4),
      "random": (_top(UNIFORM_SE, 1), 2), "hash": ([[[0, 1, 2, 3, 1, 2][t]] for t in TOKEN_IDS], 2),
      "sinkhorn": (_top(_sinkhorn_balanced()[0], 2), 4), "deepseek": (_deepseek_grouped(), 4),
  }
  references = {name: (choices, _claim(choices, c), c)
                for name, (choices, c) in token_choice.items()}
  picks = _expert_choice_picks(LOGITS_SE)
  chosen = [[e for e in range(E) if s in picks[e]] for s in range(S)]
  references["expert_choice"] = (chosen, chosen, 2)  # a pick is an assignment, always kept
  return references


def test_every_router_reports_the_same_metrics():
  text = _walkthrough()
  for name, (assigned, kept, capacity) in _reference_assignments().items():
    assigned_E = np.bincount(sum(assigned, []), minlength=E)
    kept_E = np.bincount(sum(kept, []), minlength=E)
    expected = [sum(not k for k in kept) / S, kept_E.sum() / S,
                assigned_E.max() / assigned_E.mean() - 1, np.sum(kept_E == 0),
                kept_E.sum() / (E * capacity)]
    match = re.search(rf"^metrics {re.escape(name)} +((?:\S+ *){{5}})$", text, re.M)
    assert match, name
    np.testing.assert_allclose([float(v) for v in match.group(1).split()], expected, atol=1e-4,
                               err_msg=name)
  # Soft MoE: each expert processes its p = 1 slot; nothing dropped; E * p / S rows per token.
  match = re.search(r"^metrics soft +((?:\S+ *){5})$", text, re.M)
  assert match
  np.testing.assert_allclose([float(v) for v in match.group(1).split()],
                             [0.0, E / S, 0.0, 0.0, 1.0], atol=1e-4)


def test_causality_of_every_router():
  text = _walkthrough()
  expected = {  # kind: (k, causal in training, causal in evaluation)
      "switch": ("1", True, True), "gshard": ("2", True, True), "topk": ("any", True, True),
      "noisy_topk": ("any", True, True), "random": ("any", True, True), "hash": ("1", True, True),
      "deepseek": ("any", True, True), "sinkhorn": ("any", False, True),
      "expert_choice": ("-", False, False), "soft": ("-", False, False),
  }
  printed = {}
  for match in re.finditer(r"^causality (\w+) +(\S+) +(True|False) +(True|False)", text, re.M):
    printed[match.group(1)] = (match.group(2), match.group(3) == "True", match.group(4) == "True")
  assert printed == expected


STUDY_DIRS = [REPO / "tests" / "fixtures" / "studies", REPO / "docs" / "studies"]


@pytest.mark.parametrize("studies", STUDY_DIRS, ids=["fixture", "committed"])
def test_reproduction_notebook_prints_and_draws_the_study_numbers(studies):
  """Every study's table line and figure reading, against its JSON: on the fixture report and on
  the committed studies (docs/studies), whichever are there."""
  nb = _execute(REPO / "notebooks" / "reproduction.ipynb", MOEJAX_STUDIES_DIR=str(studies))
  text = _stdout(nb)
  results = [json.loads(path.read_text()) for path in sorted(studies.glob("*.json"))]
  if studies == STUDY_DIRS[0]:
    assert [r["study"] for r in results] == ["tiny"]
  names = [r["study"] for r in results]
  assert f"{len(results)} studies in {studies.relative_to(REPO)}: {', '.join(names)}" in text
  sections = re.split(r"^== (\S+)  \(.*\)$", text, flags=re.M)
  tables = dict(zip(sections[1::2], sections[2::2]))
  assert sorted(tables) == sorted(names)
  images = [out for cell in nb.cells for out in cell.get("outputs", [])
            if "image/png" in out.get("data", {})]
  assert len(images) == sum(len(r["plots"]) + len(r["curves"]) for r in results)
  lines = text.splitlines()
  for result in results:
    table = tables[result["study"]].splitlines()
    for run in result["runs"]:
      line = next(line for line in table if line.startswith(f"{run['name']}: "))
      cells = line[len(run["name"]) + 2:].split("; ")
      assert [c.split(" ", 1)[0] for c in cells] == result["table_metrics"]
      for cell in cells:
        metric, value = cell.split(" ", 1)
        study_cells.assert_cell_matches(value, run["metrics"].get(metric),
                                        f"{result['study']} {run['name']} {metric}")
    tag = f"[{result['study']}] "
    readings = [line for line in lines if line.startswith(tag)]
    assert [r[len(tag):].split(" ", 1)[0].rstrip(":") for r in readings] == [
        *result["plots"], *result["curves"]]
    loss = {run["name"]: run["metrics"]["eval/loss"]["mean"] for run in result["runs"]
            if run["metrics"].get("eval/loss", {}).get("mean") is not None}
    if "eval/loss" in result["plots"]:
      reading = readings[result["plots"].index("eval/loss")]
      assert reading.startswith(f"{tag}eval/loss: lowest for {min(loss, key=loss.get)}, ")
