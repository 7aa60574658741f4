"""What a study job's workdir says about it: finished, failed, resumable or new.

    finished   metrics.jsonl holds the record of the last step with its evaluation
    failed     the runner's record (WORKDIR/study_run.json) says its last attempt failed
    resume     checkpoints exist: the trainer resumes from the newest
    new        nothing yet
"""

from __future__ import annotations

import dataclasses
import json

from etils import epath

from moejax import metrics as metrics_lib
from moejax import storage
from moejax.study.spec import Job

RECORD_FILE = "study_run.json"


@dataclasses.dataclass
class RunRecord:
  """The runner's record of one job (WORKDIR/study_run.json).

  Attributes:
    wall_seconds: wall time of all its attempts so far (an attempt cut short by a SIGKILL of the
      study is not counted).
    attempts: how many times it was started.
    failed: why its last attempt failed (None: it did not).
  """

  wall_seconds: float = 0.0
  attempts: int = 0
  failed: str | None = None

  @classmethod
  def read(cls, workdir: epath.Path) -> RunRecord:
    path = epath.Path(workdir) / RECORD_FILE
    if not path.exists():
      return cls()
    values = json.loads(path.read_text())
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})

  def write(self, workdir: epath.Path) -> None:
    storage.replace_text(epath.Path(workdir) / RECORD_FILE,
                             json.dumps(dataclasses.asdict(self), indent=1) + "\n")


def last_step(workdir) -> int:
  """The last step metrics.jsonl records (0 without any)."""
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return 0
  records = metrics_lib.read_jsonl(path)
  return records[-1]["step"] if records else 0


def latest_checkpoint(workdir) -> int:
  """The newest checkpoint's step in WORKDIR/checkpoints (0 without any): where a run resumes."""
  directory = epath.Path(workdir) / "checkpoints"
  if not directory.is_dir():
    return 0
  return max((int(p.name) for p in directory.iterdir() if p.name.isdigit()), default=0)


def is_finished(job: Job) -> bool:
  """Whether metrics.jsonl records the job's last step together with its final evaluation."""
  path = job.workdir / "metrics.jsonl"
  if not path.exists():
    return False
  return any(r["step"] == job.num_steps and "eval/loss" in r
             for r in metrics_lib.read_jsonl(path))


def status(job: Job) -> str:
  """"finished", "failed", "resume" or "new" (see the module docstring)."""
  if is_finished(job):
    return "finished"
  if RunRecord.read(job.workdir).failed is not None:
    return "failed"
  return "resume" if latest_checkpoint(job.workdir) else "new"
