"""moejax's entry point: flags -> config -> `train.train_and_evaluate`.

    python -m moejax.main --config=experiments/switch_small.py --workdir=runs/switch_small
    python -m moejax.main --config=experiments/switch_small.py:tiny --workdir=/tmp/tiny \
        --config.train.num_steps=20 --config.mesh.expert=8

`--config=FILE[:ARG]` loads `get_config(ARG)` from FILE; `--config.a.b=value` overrides one field.
Rerunning on the same workdir resumes from its newest checkpoint. With several processes
(`launch/local.sh`, SLURM, a TPU pod) every process runs this same command;
`moejax.distributed.Peers.join` joins them into one JAX runtime first and watches them.

How a run ends (exit status):

  0   The run finished, or SIGTERM stopped it. In the training loop a SIGTERM saves a checkpoint
      first; before the loop (joining, dataset build, compilation) there is nothing to save yet,
      and the run prints "moejax: stopped by SIGTERM before training started; nothing to save".
      Python handles the signal once the running native call returns (a compilation, joining
      the other processes), so during a long compilation the stop waits for it.
  1   An error: its traceback is printed. With several processes, also when another process
      failed (its reason is printed).
  2   Bad input: a flag or config value, or a --workdir or data.data_dir that cannot be used.
      One line "moejax: <message>" on stderr; `--traceback` prints the traceback before it.
  75  Another process of the run stopped responding (`distributed.EXIT_PEER_LOST`); the line
      names it. Rerunning the same command on all processes resumes.

What counts as bad input: moejax validates every setting with a ValueError that names the
field, the value and what is allowed (the typed configs, the mesh layout, the data pipeline),
and the ValueErrors JAX raises before training (a sharding that does not fit) come from
settings too; so every ValueError is reported in one line. The price: a bug that raises
ValueError mid-training is also reported in one line, its traceback one flag away. OS errors
name the setting they concern (`--workdir`, `data.data_dir`); both directories are created (and
the workdir test-written) before anything else, so an unusable one fails at once.
"""

import functools
import os
import signal
import sys
import threading
import time
import traceback

from absl import app, flags, logging
from etils import epath
import ml_collections
from ml_collections import config_flags

from moejax import checkpoint, distributed, divergence, train
from moejax import lock as lock_lib
from moejax.config import experiment_config_from

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file (experiments/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_TRACEBACK = flags.DEFINE_bool("traceback", False,
                               "Print the traceback of a bad-input error before its one line.")
flags.mark_flags_as_required(["config", "workdir"])

EXIT_USAGE = 2
STOPPED_EARLY = "stopped by SIGTERM before training started; nothing to save"


class UsageError(Exception):
  """Bad input found by the entry point itself (an unusable directory)."""


class StoppedBeforeTraining(BaseException):
  """SIGTERM arrived before the training loop installed its own handler."""


def _say(line: str) -> None:
  print(f"moejax: {line}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- SIGTERM


class EarlySigterm:
  """SIGTERM handling until the training loop takes over (`checkpoint.PreemptionFlag`).

  A SIGTERM before the loop raises `StoppedBeforeTraining` in the main thread: nothing is
  saved yet, so the run just ends. Python runs the handler between any two bytecodes, also
  inside a garbage-collector callback (JAX registers one) or a `__del__`, where the exception
  is swallowed; so the handler remembers the request, the swallowed exception is kept off
  stderr, and a watcher thread signals again until the main thread has taken the stop
  (`acknowledge`). The loop installs its own handler (saves, then stops) and restores this one
  when it ends; a SIGTERM after that only lets the run finish (its last checkpoint may still be
  being written). The watcher notices the loop's handler (it polls every 50 ms), so a loop
  shorter than that may go unnoticed.
  """

  RESEND_AFTER_S = 0.5  # a raised stop not taken by then was swallowed: signal again

  def __init__(self):
    self.loop_started = threading.Event()
    self._handler = self._handle  # one bound method object, compared by identity
    self._previous = None
    self._previous_unraisable = None
    self._done = threading.Event()
    self._requested_at: float | None = None
    self._acknowledged = False

  def __enter__(self) -> "EarlySigterm":
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handler)
      self._previous_unraisable = sys.unraisablehook
      sys.unraisablehook = self._unraisable
      threading.Thread(target=self._watch, name="moejax-sigterm", daemon=True).start()
    return self

  def __exit__(self, *exc_info) -> None:
    self._done.set()
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      sys.unraisablehook = self._previous_unraisable

  def acknowledge(self) -> None:
    """The main thread caught `StoppedBeforeTraining`: no more signals, no more raising."""
    self._acknowledged = True

  def _watch(self) -> None:
    while not self._done.wait(0.05):
      if self._acknowledged:
        return
      requested_at = self._requested_at
      if signal.getsignal(signal.SIGTERM) is not self._handler:
        if requested_at is not None:  # a swallowed stop: the loop's handler saves, then stops
          os.kill(os.getpid(), signal.SIGTERM)
        self.loop_started.set()
        return
      if requested_at is not None and time.monotonic() - requested_at > self.RESEND_AFTER_S:
        os.kill(os.getpid(), signal.SIGTERM)  # the raised stop was swallowed: ask again

  def _handle(self, signum, frame) -> None:
    del signum, frame
    if self._acknowledged:
      return
    if self.loop_started.is_set():
      _say("SIGTERM after the training loop: the run ends once its last checkpoint is written.")
      return
    self._requested_at = time.monotonic()
    raise StoppedBeforeTraining()

  def _unraisable(self, unraisable) -> None:
    if isinstance(unraisable.exc_value, StoppedBeforeTraining):
      return  # swallowed where it was raised; the watcher signals again
    self._previous_unraisable(unraisable)


# ----------------------------------------------------------------------------- paths


def _data_dir_field(data_config) -> str:
  """How a user names the data directory: `data.data_dir=...`, or where the unset one points."""
  if data_config.data_dir:
    return f"data.data_dir={data_config.data_dir!r}"
  if os.environ.get("MOEJAX_DATA_DIR"):
    return f"data.data_dir (unset; $MOEJAX_DATA_DIR={os.environ['MOEJAX_DATA_DIR']!r})"
  return "data.data_dir (unset; default '~/tensorflow_datasets')"


def _make_directory(path: epath.Path, field: str, *, check_writable: bool) -> None:
  """Creates `path` (and its parents); raises UsageError naming `field` when it cannot be used."""
  blocking = _file_in_the_way(path)
  if blocking is not None:
    where = "" if blocking == path else "cannot create it: "
    raise UsageError(f"{field}: {where}{blocking} is a file, not a directory")
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise UsageError(f"{field}: cannot create it: {_os_reason(error)}") from error
  if check_writable and "://" not in str(path):  # a local file system; object stores: no probe
    probe = path / f".moejax-write-check-{os.getpid()}"
    try:
      probe.write_text("")
      probe.unlink()
    except OSError as error:
      raise UsageError(f"{field}: cannot write in it: {_os_reason(error)}") from error


def _file_in_the_way(path: epath.Path) -> epath.Path | None:
  """`path` or the parent of it that exists and is not a directory, if any (local paths)."""
  if "://" in str(path):
    return None
  for candidate in [*reversed(path.parents), path]:
    if candidate.exists() and not candidate.is_dir():
      return candidate
  return None


def _os_reason(error: OSError) -> str:
  if error.strerror and error.filename:
    return f"{error.strerror}: {error.filename!r}"
  return error.strerror or str(error)


def _path_fields(workdir: str, data_config) -> list[tuple[str, str]]:
  """(absolute directory, how the user names it) for the directories moejax writes to."""
  fields = [(os.path.abspath(workdir), f"--workdir={workdir!r}")]
  if data_config is not None:
    fields.append((os.path.abspath(data_config.resolved_data_dir()), _data_dir_field(data_config)))
  return fields


def os_error_message(error: OSError, fields: list[tuple[str, str]]) -> str | None:
  """The one-line message for an OS error on a path under a known directory, else None."""
  filename = getattr(error, "filename", None)
  if not filename or "://" in str(filename):
    return None
  filename = os.path.abspath(os.fsdecode(filename))
  for directory, field in fields:
    if filename == directory or filename.startswith(directory + os.sep):
      return f"{field}: {_os_reason(error)}"
  return None


def resume_advice(workdir: str) -> str:
  """What to run to go on, and from which checkpoint."""
  try:
    steps = [int(p.name) for p in (epath.Path(workdir) / "checkpoints").iterdir()
             if p.name.isdigit()]
  except OSError:
    steps = []
  where = (f"checkpoint step {max(steps)} in {workdir}" if steps else
           f"the start (no checkpoint in {workdir} yet)")
  return f"rerun the same command on all processes to resume from {where}"


# ----------------------------------------------------------------------------- errors

# Errors whose message says all a user needs (what happened, what was kept, what to do).
RUN_ERRORS = (divergence.NonFiniteError, lock_lib.WorkdirLockedError, checkpoint.CheckpointError)


def _report(error: Exception, fields: list[tuple[str, str]]) -> tuple[int, str]:
  """Prints `error` the way moejax reports it; returns (exit status, a one-line reason)."""
  if isinstance(error, (UsageError, ValueError)):
    message, status = str(error), EXIT_USAGE
  elif isinstance(error, RUN_ERRORS):  # moejax's own reports of a run that cannot go on
    message, status = str(error), 1
  elif isinstance(error, OSError):
    message, status = os_error_message(error, fields), 1
  else:
    message, status = None, 1
  if message is None:  # not bad input: the traceback says where
    traceback.print_exception(error)
    return 1, distributed.first_line(error)
  if _TRACEBACK.value:
    traceback.print_exception(error)
  _say(message)
  return status, message.splitlines()[0] if message.strip() else type(error).__name__


def _end(peers, status: int, kind: str, reason: str) -> None:
  """Exits with `status`; with several processes first records `reason` for the others."""
  if peers is None:
    sys.exit(status)
  peers.leave(kind, reason)
  sys.stdout.flush()
  sys.stderr.flush()
  # Not sys.exit: JAX's exit handler would wait for the other processes, which are leaving too.
  os._exit(status)  # pylint: disable=protected-access


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with its errors (and the config file's) as one line, status 2."""
  try:
    remaining = flags.FLAGS(argv)
  except Exception as error:  # pylint: disable=broad-except
    if "--traceback" in argv:
      traceback.print_exception(error)
    _say(_unknown_config_field(argv) or _flag_error_line(error))
    sys.exit(EXIT_USAGE)
  config = flags.FLAGS["config"]
  if config.value is not None and not isinstance(config.value, ml_collections.ConfigDict):
    # config_flags defers an unreadable experiment file's error to the config's first use.
    reason = str(vars(config.value).get("_error", "")).strip().splitlines() or ["unknown error"]
    _say(f"--config={config.config_filename}: cannot load it: {reason[-1].strip()}")
    sys.exit(EXIT_USAGE)
  return remaining


def _flag_error_line(error: Exception) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if not lines:
    return type(error).__name__
  # A failing config file's own traceback is nested in the message: its last line says why.
  text = lines[0] if len(lines) == 1 else f"{lines[0].split(': ', 1)[0]}: {lines[-1]}"
  return text.removeprefix("flag ")


def _unknown_config_field(argv: list[str]) -> str | None:
  """The message for a `--config.a.b=value` whose field the loaded config lacks, if any."""
  files = [arg.split("=", 1)[1] for arg in argv[1:] if arg.startswith("--config=")]
  if not files:
    return None
  try:  # the experiment file again: a failed parse leaves the flag without a value
    config = flags.FLAGS["config"].parser.parse(files[-1])
  except Exception:  # pylint: disable=broad-except
    return None
  if not isinstance(config, ml_collections.ConfigDict):
    return None
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0]
    node, walked = config, []
    for name in path.split("."):
      if not hasattr(node, "keys") or name not in node.keys():
        where = ".".join(walked) or "the config"
        known = sorted(node.keys()) if hasattr(node, "keys") else []
        return (f"--config.{path}: {where} has no field {name!r}" +
                (f"; its fields: {', '.join(known)}" if known else ""))
      node, walked = node[name], walked + [name]
  return None


# ----------------------------------------------------------------------------- main


def main(argv):
  if len(argv) > 1:
    _say(f"unexpected arguments {argv[1:]}: every setting is a flag (--config.a.b=value)")
    sys.exit(EXIT_USAGE)
  if not flags.FLAGS["verbosity"].present:
    # Orbax and TFDS log every step of saving and building at INFO; --verbosity=0 shows them.
    logging.set_verbosity(logging.WARNING)
  workdir = _WORKDIR.value
  fields = _path_fields(workdir, None)
  peers = None
  with EarlySigterm() as early:
    try:
      peers = distributed.Peers.join(resume_advice=functools.partial(resume_advice, workdir))
      experiment = experiment_config_from(_CONFIG.value)
      fields = _path_fields(workdir, experiment.data)
      _make_directory(epath.Path(workdir), fields[0][1], check_writable=True)
      _make_directory(experiment.data.resolved_data_dir(), fields[1][1], check_writable=False)
      train.train_and_evaluate(_CONFIG.value, workdir)
      if peers is not None:
        peers.finish()
    except StoppedBeforeTraining:
      early.acknowledge()
      _say(STOPPED_EARLY)
      if peers is None:
        # At once: nothing is saved, and tearing the interpreter down while XLA may still be
        # compiling on its own threads can crash (seen as a segmentation fault under load).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # pylint: disable=protected-access
      _end(peers, 0, "stopped", f"was {STOPPED_EARLY}")
    except Exception as error:  # pylint: disable=broad-except
      if peers is not None:  # another process may be the cause: then the watch says which
        peers.before_reporting(error)
      status, reason = _report(error, fields)
      if isinstance(error, checkpoint.CheckpointError) and peers is None:
        # At once: the writes Orbax abandoned would otherwise print tracebacks at interpreter exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)  # pylint: disable=protected-access
      _end(peers, status, "failed", reason)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
