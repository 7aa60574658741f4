"""Writing the workdir's files on a local file system or on an object store (`gs://...`).

A run's workdir may be a local (or NFS) directory or a Cloud Storage path. Objects in Cloud
Storage differ from files in four ways that matter to moejax:

* An object is written whole, and a new version replaces the old one whole: readers see the old
  content or the new, never a part. So replacing a file atomically needs no temporary file and
  rename there (`replace_text`); on a local file system it does.
* An object cannot grow. gcsfs opens an object in append mode by silently starting it over, and
  what is written becomes visible only when the file is closed. `open_append` therefore keeps
  an object's whole content in a local temporary file and uploads it whole: at most every
  $MOEJAX_UPLOAD_EVERY_SECONDS (default 10) while being written to, and at every `flush()` and
  at `close()`. A process killed between uploads loses what it wrote since the last one; the
  trainer flushes its metric writers before every checkpoint, so a resumed run finds every step
  up to its checkpoint.
* There are no file locks, but an upload can be made conditional on the object not existing
  (`create_exclusive`): of several processes that try at once, exactly one succeeds.
* There are no directories, only names with slashes: a "directory" exists while an object is
  named under it, and moving one moves each object (`move_tree`: a copy and a delete per object,
  not atomic, where a local rename is). Files made elsewhere arrive the same way, one object
  each (`upload_tree`).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
import time
from typing import Protocol

from etils import epath

UPLOAD_EVERY_VARIABLE = "MOEJAX_UPLOAD_EVERY_SECONDS"
UPLOAD_EVERY_DEFAULT = 10.0


def upload_every_seconds() -> float:
  """How often an appended object is uploaded while written to: $MOEJAX_UPLOAD_EVERY_SECONDS,
  default 10 (each upload sends the whole file: more often costs more requests and bytes)."""
  text = os.environ.get(UPLOAD_EVERY_VARIABLE, "")
  if not text:
    return UPLOAD_EVERY_DEFAULT
  try:
    value = float(text)
  except ValueError:
    value = -1.0
  if not value >= 0:  # also NaN
    raise ValueError(f"{UPLOAD_EVERY_VARIABLE}={text!r} must be a number of seconds >= 0.")
  return value


def is_object_store(path: str | os.PathLike) -> bool:
  """Whether `path` is a URL (gs://, s3://, ...) rather than a local or mounted file system."""
  return "://" in os.fspath(path)


def replace_text(path: epath.Path, text: str) -> None:
  """Replaces the file `path` with `text` atomically: readers see the old or the new content.

  On an object store one upload does that. Locally the text goes to a temporary file beside
  `path` (written and synced), which then takes its name with os.replace.
  """
  if is_object_store(path):
    path.write_text(text)
    return
  temporary = path.parent / f".{path.name}.{os.getpid()}.tmp"
  try:
    with open(temporary, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except BaseException:
    temporary.unlink(missing_ok=True)
    raise


def create_exclusive(path: epath.Path, text: str) -> bool:
  """Creates the file `path` holding `text` unless it exists; False when it existed.

  Atomic on local file systems (O_EXCL) and on Cloud Storage (an upload conditional on the
  object's absence: `ifGenerationMatch=0`, through fsspec's exclusive mode "xb").
  """
  try:
    if is_object_store(path):
      import fsspec  # pylint: disable=g-import-not-at-top  (installed with gcsfs)
      file_system, inner = fsspec.core.url_to_fs(os.fspath(path))
      with file_system.open(inner, "xb") as f:
        f.write(text.encode())
    else:
      fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
  except FileExistsError:
    return False
  return True


def move_tree(source: epath.Path, target: epath.Path) -> None:
  """Moves the directory `source` (and everything in it) to `target`, which must not exist.

  Locally a rename (atomic; `target`'s parent must exist). On an object store each object is
  copied and then deleted; `target`'s parent needs no creating there (and cannot be created: a
  folder without objects does not exist), which `epath`'s rename insists on.
  """
  if not is_object_store(source):
    source.rename(target)
    return
  if target.exists():
    raise FileExistsError(f"{target} already exists; cannot move {source} there")
  import fsspec  # pylint: disable=g-import-not-at-top  (installed with gcsfs)
  file_system, _ = fsspec.core.url_to_fs(os.fspath(source))
  file_system.mv(os.fspath(source), os.fspath(target), recursive=True)


def upload_tree(local: str | os.PathLike, target: epath.Path) -> None:
  """Copies the local folder `local`'s files into the folder `target` (an object store or a
  local path), keeping their relative paths and replacing files of the same name."""
  local = pathlib.Path(local)
  for source in sorted(p for p in local.rglob("*") if p.is_file()):
    destination = target / source.relative_to(local).as_posix()
    if not is_object_store(target):
      destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_bytes(source.read_bytes())


class AppendFile(Protocol):
  """What a writer needs of a file it appends to (bytes)."""

  def write(self, data: bytes) -> int:
    ...

  def flush(self) -> None:
    ...

  def close(self) -> None:
    ...


def open_append(path: str | os.PathLike, upload_every: float | None = None) -> AppendFile:
  """`path` opened for appending bytes, created when missing (see the module docstring).

  A local file is unbuffered: each write reaches the operating system at once (`tail -f`). An
  object is uploaded every `upload_every` seconds (None: `upload_every_seconds()`).
  """
  if is_object_store(path):
    if upload_every is None:
      upload_every = upload_every_seconds()
    return ObjectAppender(epath.Path(path), upload_every=upload_every)
  return open(os.fspath(path), "ab", buffering=0)  # pylint: disable=consider-using-with


class ObjectAppender:
  """Appends to an object-store object by uploading its whole content again.

  The content (the object's at opening, then everything written) is kept in a local temporary
  file. `write` uploads when `upload_every` seconds have passed since the last upload (0: at
  every write); `flush` and `close` upload what changed since.
  """

  def __init__(self, path: epath.Path, *, upload_every: float = UPLOAD_EVERY_DEFAULT):
    self.path = path
    self._upload_every = upload_every
    self._local = tempfile.TemporaryFile()  # pylint: disable=consider-using-with
    self._changed = True  # a new object is created by the first upload
    if path.exists():
      with path.open("rb") as source:
        shutil.copyfileobj(source, self._local)
      self._changed = False
    self._uploaded_at = time.monotonic()
    self.closed = False

  def write(self, data: bytes) -> int:
    if self.closed:
      raise ValueError(f"{self.path}: write to a closed file")
    written = self._local.write(data)
    self._changed = True
    if time.monotonic() - self._uploaded_at >= self._upload_every:
      self.flush()
    return written

  def flush(self) -> None:
    """Uploads the content if it changed since the last upload."""
    if self.closed or not self._changed:
      return
    self._local.flush()
    self._local.seek(0)
    with self.path.open("wb") as target:
      shutil.copyfileobj(self._local, target)
    self._local.seek(0, os.SEEK_END)
    self._changed = False
    self._uploaded_at = time.monotonic()

  def close(self) -> None:
    if self.closed:
      return
    try:
      self.flush()
    finally:
      self.closed = True
      self._local.close()
