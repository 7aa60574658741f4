"""The documents the code and the README point readers to exist, and their commands work here."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted([*REPO.glob("moejax/**/*.py"), *REPO.glob("experiments/**/*.py"),
                  *REPO.glob("benchmarks/*.py"), *REPO.glob("tests/*.py"), REPO / "README.md",
                  *REPO.glob("docs/*.md"), *REPO.glob("launch/*")])


def _cited_documents():
  cited = set()
  for path in SOURCES:
    for match in re.finditer(r"(?<![\w/.])((?:docs|launch|notebooks)/[\w./-]+\.(?:md|ipynb|png))",
                             path.read_text(errors="replace")):
      cited.add((match.group(1), path.relative_to(REPO).as_posix()))
  return sorted(cited)


def test_some_documents_are_cited():
  assert any(doc == "docs/design.md" for doc, _ in _cited_documents())


@pytest.mark.parametrize("doc, cited_in", _cited_documents())
def test_every_cited_document_exists(doc, cited_in):
  assert (REPO / doc).exists(), f"{cited_in} cites {doc}, which the repository does not hold"


def test_no_document_cites_a_design_file_outside_the_repository():
  for path in SOURCES:
    text = path.read_text(errors="replace")
    assert not re.search(r"(?<![\w/])DESIGN\.md", text), path


def test_readme_tensorboard_command_runs_from_the_venv():
  readme = (REPO / "README.md").read_text()
  commands = re.findall(r"`([^`]*tensorboard --logdir[^`]*)`", readme)
  assert commands and all(c.startswith(".venv/bin/tensorboard ") for c in commands), commands
  tensorboard = pathlib.Path(sys.executable).parent / "tensorboard"
  assert tensorboard.exists()
  result = subprocess.run([str(tensorboard), "--version_tb"], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ))
  assert result.returncode == 0, result.stderr
