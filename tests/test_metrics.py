"""Metric writers: flattening, TensorBoard event files read back by TensorBoard, JSONL, progress."""

import io
import json

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from moejax import metrics


def _read_tensorboard(logdir):
  accumulator = event_accumulator.EventAccumulator(str(logdir))
  accumulator.Reload()
  return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
          for tag in accumulator.Tags()["scalars"]}


def test_flatten_metrics_names_vector_entries_by_index():
  tree = {"train": {"loss": np.float32(2.5)},
          "moe": {"layer_1": {"expert_load": np.array([0.5, 0.25, 0.25]), "dropped": 0.125}}}
  assert metrics.flatten_metrics(tree) == {
      "train/loss": 2.5,
      "moe/layer_1/expert_load/0": 0.5,
      "moe/layer_1/expert_load/1": 0.25,
      "moe/layer_1/expert_load/2": 0.25,
      "moe/layer_1/dropped": 0.125,
  }


def test_flatten_metrics_rejects_matrices():
  with pytest.raises(ValueError, match="moe/m"):
    metrics.flatten_metrics({"moe": {"m": np.zeros((2, 2))}})


def test_tensorboard_event_files_read_back_with_tensorboard(tmp_path):
  writer = metrics.TensorBoardWriter(tmp_path)
  writer.write_scalars(10, {"train/loss": 4.25, "moe/layer_1/expert_load/3": 0.125})
  writer.write_scalars(20, {"train/loss": 3.5})
  writer.close()
  assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
  scalars = _read_tensorboard(tmp_path)
  # 4.25, 3.5 and 0.125 are exact in float32, TensorBoard's storage type.
  assert scalars == {"train/loss": [(10, 4.25), (20, 3.5)],
                     "moe/layer_1/expert_load/3": [(10, 0.125)]}


def test_jsonl_one_object_per_step_and_resume_drops_later_steps(tmp_path):
  path = tmp_path / "metrics.jsonl"
  writer = metrics.JsonlWriter(path)
  for step in (1, 2, 3, 4):
    writer.write_scalars(step, {"train/loss": 1.0 / step})
    # Each record is on disk as soon as it is written (a running job can be followed).
    assert metrics.read_jsonl(path)[-1] == {"step": step, "train/loss": 1.0 / step}
  writer.close()
  assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
  # A run resumed from the checkpoint of step 2 rewrites steps 3 and 4.
  writer = metrics.JsonlWriter(path, resume_step=2)
  writer.write_scalars(3, {"train/loss": 7.0, "x": float("nan")})
  writer.close()
  records = metrics.read_jsonl(path)
  assert records == [{"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 0.5},
                     {"step": 3, "train/loss": 7.0, "x": "nan"}]


def test_only_process_zero_writes(tmp_path):
  writer = metrics.create_writers(tmp_path / "p1", process_index=1)
  writer.write_scalars(1, {"a": 1.0})
  writer.close()
  assert not (tmp_path / "p1").exists()
  writer = metrics.create_writers(tmp_path / "p0", process_index=0)
  writer.write_scalars(1, {"a": 1.0})
  writer.close()
  assert metrics.read_jsonl(tmp_path / "p0" / "metrics.jsonl") == [{"step": 1, "a": 1.0}]
  assert _read_tensorboard(tmp_path / "p0" / "tensorboard") == {"a": [(1, 1.0)]}


class _Terminal(io.StringIO):

  def isatty(self):
    return True


def test_progress_bar_lines():
  log = io.StringIO()
  bar = metrics.ProgressBar(600, stream=log)
  bar.update(120, 4.8123, 21_300.0)
  bar.update(600, 3.25, 950.0)
  bar.close()
  assert log.getvalue() == ("step 120/600 loss 4.812 tok/s 21.3k\n"
                            "step 600/600 loss 3.250 tok/s 950\n")


def test_progress_bar_rewrites_one_terminal_line():
  term = _Terminal()
  bar = metrics.ProgressBar(50, stream=term)
  bar.update(5, 2.0, 1.5e6)
  bar.update(10, 1.0, 2e3)
  bar.close()
  assert term.getvalue() == ("\rstep  5/50 loss 2.000 tok/s 1.50M\x1b[K"
                             "\rstep 10/50 loss 1.000 tok/s 2.0k\x1b[K\n")


def test_disabled_progress_bar_writes_nothing():
  log = io.StringIO()
  bar = metrics.ProgressBar(10, enabled=False, stream=log)
  bar.update(1, 1.0, 1.0)
  bar.close()
  assert log.getvalue() == ""


def test_progress_bar_notes_stay_on_their_own_line():
  term = _Terminal()
  bar = metrics.ProgressBar(10, stream=term)
  bar.update(5, 2.0, 100.0)
  bar.note("step 5: validation loss 2.1000, perplexity 8.17")
  bar.update(10, 1.0, 100.0)
  bar.close()
  assert term.getvalue() == ("\rstep  5/10 loss 2.000 tok/s 100\x1b[K\n"
                             "step 5: validation loss 2.1000, perplexity 8.17\n"
                             "\rstep 10/10 loss 1.000 tok/s 100\x1b[K\n")


def test_resumed_writers_replace_what_the_interrupted_run_logged_after_its_checkpoint(tmp_path):
  writer = metrics.create_writers(tmp_path, process_index=0, resume_step=0)
  for step in (1, 2, 3, 4):
    writer.write_scalars(step, {"train/loss": float(step)})
  writer.close()
  # Interrupted after step 4, resumed from the checkpoint of step 2: steps 3 and 4 again.
  writer = metrics.create_writers(tmp_path, process_index=0, resume_step=2)
  for step in (3, 4, 5):
    writer.write_scalars(step, {"train/loss": 10.0 * step})
  writer.close()
  expected = [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]
  assert _read_tensorboard(tmp_path / "tensorboard") == {"train/loss": expected}
  records = metrics.read_jsonl(tmp_path / "metrics.jsonl")
  assert [(r["step"], r["train/loss"]) for r in records] == expected
