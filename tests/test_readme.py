"""The Python examples of the README and of the docs pages run as written."""

import pathlib
import re

import jax
import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
PAGES = sorted((README.parent / "docs").glob("*.md"))


@pytest.mark.parametrize("page", [README] + PAGES, ids=lambda p: p.name)
def test_python_blocks_run(page):
  blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
  if page == README:
    assert blocks, "README has no python example"
  # As a user runs them: numpy's rank promotion (the suite's own code runs with "raise").
  with jax.numpy_rank_promotion("allow"):
    for block in blocks:
      exec(compile(block, str(page), "exec"), {"__name__": "readme"})  # pylint: disable=exec-used


def test_license_file_matches_pyproject():
  import tomllib  # pylint: disable=g-import-not-at-top
  root = README.parent
  project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
  assert project["license"] == "Apache-2.0"  # an SPDX expression (PEP 639)
  assert project["license-files"] == ["LICENSE"]
  text = " ".join((root / "LICENSE").read_text().split())
  assert text.startswith("Apache License Version 2.0, January 2004")
