"""Metric writers (TensorBoard event files, JSON lines) and the training progress line.

A training step returns a tree of metrics: scalars, and per MoE layer vectors such as the expert
load (E,). `flatten_metrics` turns the tree into flat scalar names,

    {"moe": {"layer_1": {"expert_load": [0.5, 0.25, 0.25]}}}
      -> {"moe/layer_1/expert_load/0": 0.5, "moe/layer_1/expert_load/1": 0.25, ...}

which every writer records under the step:

* `TensorBoardWriter`: real event files (`events.out.tfevents.*`) in TensorBoard's record format,
  written with TensorBoard's own `RecordWriter`, no TensorFlow needed; view them with
  `.venv/bin/tensorboard --logdir WORKDIR/tensorboard`.
* `JsonlWriter`: `metrics.jsonl`, one JSON object per logged step: {"step": 120, "train/loss": ...}.

Only process 0 writes (`create_writers`); the other processes get a writer that does nothing.
Both append through `storage.open_append`, so they work on a gs:// workdir too: there the files
are uploaded whole every few seconds and at every `flush()` (Cloud Storage objects cannot grow).
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from absl import logging
from etils import epath
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from moejax import storage


class MetricWriter(Protocol):

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    ...

  def flush(self) -> None:
    ...

  def close(self) -> None:
    ...


def flatten_metrics(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
  """Nested mappings of scalars and vectors -> {"a/b": float, "a/v/0": float, ...}."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten_metrics(value, prefix=f"{name}/"))
      continue
    array = np.asarray(value)
    if array.ndim == 0:
      flat[name] = float(array)
    elif array.ndim == 1:
      flat.update({f"{name}/{i}": float(v) for i, v in enumerate(array)})
    else:
      raise ValueError(f"metric {name!r} has shape {array.shape}; only scalars and vectors log.")
  return flat


def _file_time(logdir: epath.Path) -> int:
  """The <time> of a new event file in `logdir`: now, or one second after the newest file there.

  TensorBoard reads a folder's event files in name order, and a resumed run's purge only drops
  what came before it in that order. Within one second, the rest of the name (host, pid, a counter
  that reaches 10) does not sort by age, so the time field alone must.
  """
  now = int(time.time())
  times = [int(m.group(1)) for f in logdir.glob("events.out.tfevents.*")
           if (m := re.match(r"events\.out\.tfevents\.(\d+)\.", f.name))]
  return max([now, *(t + 1 for t in times)])


class TensorBoardWriter:
  """Scalar summaries in a new TensorBoard event file under `logdir`.

  The file is named as TensorBoard's own writers name theirs
  (`events.out.tfevents.<time>.<host>.<pid>.<n>`) and opens with the file-version event. Records
  reach the file at each `write_scalars` (locally) or with the next upload (object stores, see
  `storage.open_append`).

  `purge_from_step=s` (a run resumed from the checkpoint of step s - 1) first writes a session
  START event at step s, which tells TensorBoard to drop what earlier event files logged at steps
  >= s: the interrupted run's steps after its last checkpoint.
  """

  _files_opened = 0  # the <n> in the file name: unique within this process

  def __init__(self, logdir: str | os.PathLike, purge_from_step: int | None = None):
    logdir = epath.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    name = (f"events.out.tfevents.{_file_time(logdir):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{TensorBoardWriter._files_opened}")
    TensorBoardWriter._files_opened += 1
    self.path = logdir / name
    self._writer = RecordWriter(storage.open_append(self.path))
    self._add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
    if purge_from_step is not None:
      self._add(event_pb2.Event(
          wall_time=time.time(), step=int(purge_from_step),
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    values = [summary_pb2.Summary.Value(tag=tag, simple_value=float(v))
              for tag, v in scalars.items()]
    self._add(event_pb2.Event(wall_time=time.time(), step=int(step),
                              summary=summary_pb2.Summary(value=values)))

  def _add(self, event: event_pb2.Event) -> None:
    self._writer.write(event.SerializeToString())

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class JsonlWriter:
  """One JSON object per logged step, appended to `path`; each step is logged once.

  On resume from step k (`resume_step=k`), records of steps after k (logged by the interrupted run
  after its last checkpoint) are dropped first, so the file reads as one uninterrupted run. Opening
  also repairs what a killed run can leave: a last line cut short (the kill came while it was
  being written) is dropped, one that lacks only its newline gets it, and of records that name
  the same step only the last is kept. The repaired file replaces the old one atomically
  (`storage.replace_text`), so a kill during the repair leaves the old file intact. Writing a
  step that is not after the last logged one raises ValueError. Locally each record reaches the
  file as it is written (readable with `tail -f` while the run goes on); on an object store with
  the next upload (`storage.open_append`).
  """

  def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
    self._path = epath.Path(path)
    self._path.parent.mkdir(parents=True, exist_ok=True)
    self._last_step = None
    if self._path.exists():
      text = self._path.read_text()
      records, partial = _parse_jsonl(text, self._path)
      kept = [r for r in records if resume_step is None or r["step"] <= resume_step]
      kept = sorted({r["step"]: r for r in kept}.values(), key=lambda r: r["step"])
      if partial is not None:
        logging.warning("%s: dropping its last line, cut short by an interrupted run: %r",
                        self._path, partial[:80])
      if partial is not None or kept != records or (text and not text.endswith("\n")):
        storage.replace_text(self._path, "".join(json.dumps(r) + "\n" for r in kept))
      self._last_step = kept[-1]["step"] if kept else None
    self._file = storage.open_append(self._path)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._last_step is not None and step <= self._last_step:
      raise ValueError(f"{self._path}: step {step} is not after the last logged step "
                       f"{self._last_step}; each step is logged once.")
    record = {"step": int(step)}
    record.update({k: _json_number(v) for k, v in scalars.items()})
    self._file.write((json.dumps(record) + "\n").encode())
    self._last_step = int(step)

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def _json_number(value: float):
  value = float(value)
  return value if math.isfinite(value) else str(value)  # "nan", "inf": JSON has no literal


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a `metrics.jsonl` file, in order.

  A last line cut short (no newline at its end and not valid JSON: the run was killed while
  writing it, or is writing it now) is left out. Any other line that is not a JSON object with a
  "step" raises ValueError naming the file and the line number.
  """
  records, _ = _parse_jsonl(epath.Path(path).read_text(), path)
  return records


def _parse_jsonl(text: str, path) -> tuple[list[dict[str, Any]], str | None]:
  """(records, the partial last line or None); see `read_jsonl`."""
  lines = text.split("\n")  # the text after the last newline, if any, is the last element
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if number == len(lines):  # not followed by a newline: cut short
        return records, line
      raise ValueError(f"{path}, line {number}: not a JSON record ({e}): {line[:80]!r}") from None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
      raise ValueError(f"{path}, line {number}: a record must be a JSON object with an integer "
                       f"\"step\": {line[:80]!r}")
    records.append(record)
  return records, None


class MultiWriter:
  """Writes to each of `writers` (none on processes other than 0)."""

  def __init__(self, writers: Sequence[MetricWriter]):
    self._writers = list(writers)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    for writer in self._writers:
      writer.write_scalars(step, scalars)

  def flush(self) -> None:
    for writer in self._writers:
      writer.flush()

  def close(self) -> None:
    for writer in self._writers:
      writer.close()


def create_writers(workdir: str | os.PathLike, *, process_index: int,
                   resume_step: int | None = None) -> MultiWriter:
  """TensorBoard events under WORKDIR/tensorboard and WORKDIR/metrics.jsonl, on process 0 only.

  `resume_step`: the step the run restarts from (its checkpoint's; 0 for a fresh start). What an
  earlier run logged after it is dropped from both, so every step is recorded once.
  """
  if process_index != 0:
    return MultiWriter([])
  workdir = epath.Path(workdir)
  purge = None if resume_step is None else resume_step + 1
  return MultiWriter([TensorBoardWriter(workdir / "tensorboard", purge_from_step=purge),
                      JsonlWriter(workdir / "metrics.jsonl", resume_step=resume_step)])


class ProgressBar:
  """One status line on stderr, rewritten in place:
  `step 120/600 loss 4.812 tok/s 21.3k TFLOP/s/device 412 MFU 41.7%` (MFU where the device's
  peak is known).

  When stderr is not a terminal (a log file), each update is a line of its own instead.
  """

  def __init__(self, num_steps: int, *, enabled: bool = True, stream=None):
    self._num_steps = num_steps
    self._enabled = enabled
    self._stream = stream or sys.stderr
    self._in_place = hasattr(self._stream, "isatty") and self._stream.isatty()
    self._open_line = False

  def update(self, step: int, loss: float, tokens_per_sec: float, *,
             tflops: float | None = None, mfu: float | None = None) -> None:
    """`tflops`: achieved model TFLOP/s per device; `mfu`: its fraction of the peak."""
    if not self._enabled:
      return
    width = len(str(self._num_steps))
    text = (f"step {step:>{width}}/{self._num_steps} loss {loss:.3f} "
            f"tok/s {format_count(tokens_per_sec)}")
    if tflops is not None:
      text += f" TFLOP/s/device {tflops:.3g}"
    if mfu is not None:
      text += f" MFU {100 * mfu:.1f}%"
    if self._in_place:
      self._stream.write("\r" + text + "\x1b[K")
      self._open_line = True
    else:
      self._stream.write(text + "\n")
    self._stream.flush()

  def note(self, text: str) -> None:
    """A line that stays (an evaluation result), printed below the progress line."""
    if not self._enabled:
      return
    self._stream.write(("\n" if self._open_line else "") + text + "\n")
    self._stream.flush()
    self._open_line = False

  def close(self) -> None:
    if self._open_line:
      self._stream.write("\n")
      self._stream.flush()
      self._open_line = False


def format_count(value: float) -> str:
  """12345 -> '12.3k', 2.5e6 -> '2.50M'."""
  if value >= 1e6:
    return f"{value / 1e6:.2f}M"
  if value >= 1e3:
    return f"{value / 1e3:.1f}k"
  return f"{value:.0f}"
