"""Metric writers: flattening, TensorBoard event files read back by TensorBoard, JSONL, progress."""

import io
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from moejax import metrics

REPO = pathlib.Path(__file__).resolve().parents[1]


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


def _interrupted_then_resumed(workdir):
  writer = metrics.create_writers(workdir, process_index=0, resume_step=0)
  for step in (1, 2, 3):
    writer.write_scalars(step, {"train/loss": float(step)})
  writer.close()
  return metrics.create_writers(workdir, process_index=0, resume_step=1)


@pytest.mark.parametrize("opened_before", [0, 9, 99])
def test_a_resumed_runs_event_file_sorts_after_the_interrupted_runs(tmp_path, monkeypatch,
                                                                    opened_before):
  """TensorBoard reads event files in name order; the file counter going from 9 to 10 within one
  second must not put the resumed run's file (and its purge) first."""
  monkeypatch.setattr(metrics.TensorBoardWriter, "_files_opened", opened_before)
  writer = _interrupted_then_resumed(tmp_path)
  writer.write_scalars(2, {"train/loss": 20.0})
  writer.close()
  files = sorted(f.name for f in (tmp_path / "tensorboard").iterdir())
  assert files[-1].endswith(f".{opened_before + 1}")
  assert _read_tensorboard(tmp_path / "tensorboard") == {"train/loss": [(1, 1.0), (2, 20.0)]}


def test_a_resumed_runs_event_file_sorts_after_one_another_process_wrote_this_second(tmp_path):
  writer = metrics.create_writers(tmp_path, process_index=0, resume_step=0)
  writer.write_scalars(1, {"train/loss": 1.0})
  writer.close()
  (first,) = (tmp_path / "tensorboard").iterdir()
  stamp = first.name.split(".")[3]
  later_time = str(int(stamp) + 30).zfill(len(stamp))  # a clock ahead of this one, another host
  first.rename(first.with_name(f"events.out.tfevents.{later_time}.zzzz.99999999.0"))
  writer = metrics.create_writers(tmp_path, process_index=0, resume_step=0)
  writer.write_scalars(1, {"train/loss": 5.0})
  writer.close()
  names = sorted(f.name for f in (tmp_path / "tensorboard").iterdir())
  assert names[0].endswith(".zzzz.99999999.0")
  assert names[1].split(".")[3] == str(int(later_time) + 1).zfill(len(stamp))
  assert _read_tensorboard(tmp_path / "tensorboard") == {"train/loss": [(1, 5.0)]}


# ----------------------------------------------------------------------------- damaged files


def _write_lines(path, *lines, end="\n"):
  path.write_text("\n".join(lines) + end)


def test_read_jsonl_leaves_out_a_last_line_cut_short(tmp_path):
  path = tmp_path / "metrics.jsonl"
  # A run killed while it wrote the record of step 3: no newline after it.
  _write_lines(path, '{"step": 1, "a": 1.0}', '{"step": 2, "a": 2.0}', '{"step": 3, "a"', end="")
  assert metrics.read_jsonl(path) == [{"step": 1, "a": 1.0}, {"step": 2, "a": 2.0}]


@pytest.mark.parametrize("lines, end, number", [
    (['{"step": 1}', '{"step": 2, "a"', '{"step": 3}'], "\n", 2),  # cut short, not the last
    (['{"step": 1}', 'garbage'], "\n", 2),  # a complete last line that is not JSON
    (['{"step": 1}', '[1, 2]', '{"step": 3}'], "", 2),  # JSON, but not a record
    (['{"step": 1}', '{"loss": 2.0}'], "\n", 2),  # a record without a step
])
def test_read_jsonl_names_the_line_of_any_other_bad_record(tmp_path, lines, end, number):
  path = tmp_path / "metrics.jsonl"
  _write_lines(path, *lines, end=end)
  with pytest.raises(ValueError, match=rf"metrics.jsonl, line {number}: "):
    metrics.read_jsonl(path)


@pytest.mark.parametrize("resume_step", [None, 1, 2])
def test_a_writer_drops_a_last_line_cut_short_before_appending(tmp_path, resume_step):
  path = tmp_path / "metrics.jsonl"
  _write_lines(path, '{"step": 1, "a": 1.0}', '{"step": 2, "a": 2.0}', '{"step": 3, "a": 3',
               end="")
  writer = metrics.JsonlWriter(path, resume_step=resume_step)
  next_step = 3 if resume_step is None else resume_step + 1
  writer.write_scalars(next_step, {"a": 30.0})
  writer.close()
  assert path.read_text().endswith('{"step": %d, "a": 30.0}\n' % next_step)
  assert [r["step"] for r in metrics.read_jsonl(path)] == list(range(1, next_step + 1))


def test_a_writer_ends_a_complete_last_record_before_appending(tmp_path):
  path = tmp_path / "metrics.jsonl"
  # Killed after the record of step 2 but before its newline.
  _write_lines(path, '{"step": 1, "a": 1.0}', '{"step": 2, "a": 2.0}', end="")
  writer = metrics.JsonlWriter(path)
  writer.write_scalars(3, {"a": 3.0})
  writer.close()
  assert [r["step"] for r in metrics.read_jsonl(path)] == [1, 2, 3]


def test_a_writer_keeps_one_record_per_step_and_refuses_a_step_already_logged(tmp_path):
  path = tmp_path / "metrics.jsonl"
  # Two runs that shared the workdir logged steps 1 and 2 twice each.
  _write_lines(path, *('{"step": %d, "a": %d}' % (s, v) for s, v in
                       [(1, 10), (1, 11), (2, 20), (2, 21), (3, 30)]))
  writer = metrics.JsonlWriter(path, resume_step=2)
  assert metrics.read_jsonl(path) == [{"step": 1, "a": 11}, {"step": 2, "a": 21}]
  for step in (1, 2):
    with pytest.raises(ValueError, match=f"step {step} is not after the last logged step 2"):
      writer.write_scalars(step, {"a": 0.0})
  writer.write_scalars(3, {"a": 3.0})
  with pytest.raises(ValueError, match="step 3 is not after the last logged step 3"):
    writer.write_scalars(3, {"a": 3.0})
  writer.close()
  assert [r["step"] for r in metrics.read_jsonl(path)] == [1, 2, 3]


_REWRITE_UNDER_A_FILE_SIZE_LIMIT = """
import resource, signal, sys
from moejax import metrics
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))  # about one record: the disk is "full"
metrics.JsonlWriter(sys.argv[1], resume_step=int(sys.argv[2]))
"""


def test_a_resume_rewrite_that_fails_leaves_the_old_file_intact(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = ['{"step": %d, "train/loss": %r}' % (s, 1.0 / s) for s in range(1, 7)]
  _write_lines(path, *lines)
  before = path.read_text()
  # A real process whose writes fail past 64 bytes rewrites the file for a resume from step 4.
  run = subprocess.run([sys.executable, "-c", _REWRITE_UNDER_A_FILE_SIZE_LIMIT, str(path), "4"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert run.returncode != 0 and "File too large" in run.stderr, run.stderr[-2000:]
  assert path.read_text() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary left
  # Without the limit the same rewrite succeeds.
  metrics.JsonlWriter(path, resume_step=4).close()
  assert path.read_text() == "".join(line + "\n" for line in lines[:4])
