"""The README's Python examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  assert blocks, "README has no python example"
  for block in blocks:
    exec(compile(block, str(README), "exec"), {"__name__": "readme"})  # pylint: disable=exec-used


def test_license_file_matches_pyproject():
  import tomllib  # pylint: disable=g-import-not-at-top
  root = README.parent
  declared = tomllib.loads((root / "pyproject.toml").read_text())["project"]["license"]["text"]
  assert declared == "Apache-2.0"
  text = " ".join((root / "LICENSE").read_text().split())
  assert text.startswith("Apache License Version 2.0, January 2004")
