"""The README's first screen and the Python examples of the README and the docs pages
run as written."""

import os
import pathlib
import re
import shlex
import subprocess
import sys

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


def _fenced_blocks(page):
  """``[(language, text)]`` of every fenced block of a page (``""``: no language)."""
  return re.findall(r"^```(\w*)\n(.*?)^```", page.read_text(), flags=re.S | re.M)


@pytest.mark.parametrize("page", [README] + PAGES, ids=lambda p: p.name)
def test_no_python_example_escapes_the_run(page):
  """test_python_blocks_run runs the blocks marked ``python`` only: an example whose marker
  was dropped or changed would silently stop being tested. So every fenced block names its
  language, and none but a python block holds Python (an import, a normreg call, a prompt)."""
  looks_like_python = re.compile(r"^\s*(import |from \w+ import |>>> )|normreg\.\w+\(", re.M)
  for language, text in _fenced_blocks(page):
    assert language, f"{page.name}: a fenced block without a language:\n{text[:200]}"
    if language != "python":
      assert not looks_like_python.search(text), (
          f"{page.name}: Python in a {language!r} block (mark it python to run it):\n"
          f"{text[:300]}")


def test_the_python_block_scan_sees_what_it_should(tmp_path):
  page = tmp_path / "page.md"
  page.write_text("text\n```\nimport normreg\n```\n")
  with pytest.raises(AssertionError, match="without a language"):
    test_no_python_example_escapes_the_run(page)
  page.write_text("```text\nimport normreg\nnormreg.unit()\n```\n")
  with pytest.raises(AssertionError, match="Python in a 'text' block"):
    test_no_python_example_escapes_the_run(page)
  page.write_text("```bash\npython -m experiments.train --lr=0.1\n```\n")
  test_no_python_example_escapes_the_run(page)  # a command line is no Python example


def test_license_file_matches_pyproject():
  import tomllib  # pylint: disable=g-import-not-at-top
  root = README.parent
  project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
  assert project["license"] == "Apache-2.0"  # an SPDX expression (PEP 639)
  assert project["license-files"] == ["LICENSE"]
  text = " ".join((root / "LICENSE").read_text().split())
  assert text.startswith("Apache License Version 2.0, January 2004")


def _first_screen():
  """The commands of the README's first fenced block (within its first 30 lines)."""
  top = "\n".join(README.read_text().splitlines()[:30])
  blocks = re.findall(r"```(\w*)\n(.*?)```", top, flags=re.S)
  assert [kind for kind, _ in blocks] == ["bash"], "one fenced bash block in the first 30 lines"
  return [line.split("  #")[0].strip() for line in blocks[0][1].splitlines() if line.strip()]


def test_first_screen_installs_and_tests_as_ci_does():
  commands = _first_screen()
  ci = [line.strip() for line in (README.parent / ".ci" / "run").read_text().splitlines()]
  install = [c for c in commands if c.startswith("pip install")]
  tests = [c for c in commands if c.startswith("pytest")]
  assert len(install) == 1 and install[0] in ci, (install, "CI installs as the README says")
  assert len(tests) == 1 and tests[0] in ci, (tests, "CI runs the README's test command")


# The first screen's training command, run with the flags it has and a shorter run, with
# tensorflow-datasets and TensorFlow unimportable and the network unreachable.
_OFFLINE = """
import runpy, sys
sys.modules["tensorflow"] = sys.modules["tensorflow_datasets"] = None
sys.argv = sys.argv[1:]
runpy.run_module("experiments.train", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_first_screen_trains_offline_and_says_where_its_metrics_and_figures_are(tmp_path):
  train = [c for c in _first_screen() if c.startswith("python -m experiments.train")]
  assert len(train) == 1, "one training command"
  args = shlex.split(train[0])[3:]
  workdir = tmp_path / "run"
  quick = ["--epochs=1", "--train_size=256", "--test_size=100", f"--workdir={workdir}"]
  result = subprocess.run(
      [sys.executable, "-c", _OFFLINE, "experiments.train", *args, *quick],
      capture_output=True, text=True, timeout=600, cwd=README.parent,
      env=dict(os.environ, HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9"))
  assert result.returncode == 0, result.stderr[-3000:]
  with open(workdir / "config.json") as f:
    assert '"dataset": "digits"' in f.read()
  last = result.stdout.splitlines()[-1]
  assert re.fullmatch(rf"test accuracy [01]\.\d{{4}} after 1 epoch \(\d+ steps, \d+ s\); "
                      rf"metrics: "
                      rf"{re.escape(str(workdir / 'metrics.jsonl'))}; figures: "
                      rf"{re.escape(str(workdir / 'figures'))}/", last), last
  assert len(list((workdir / "figures").glob("*.png"))) == 5
