"""mkdocs hooks: repository files served beside the pages, and mathematics as MathML.

The pages link to files outside docs/ by their path in the repository
(``../experiments/RESULTS.md``, ``../experiments/figures/equivalences.png``),
which is right in a checkout and on a code host. mkdocs knows only the files
under docs/, so :func:`on_files` adds the files of :data:`REPOSITORY_FILES`
to the site under ``repository/`` and :func:`on_page_markdown` points the
links there. A link to a file that does not exist is left as written, and the
strict build fails on it.

Mathematics (``$...$`` and ``$$...$$`` in a page, the docstrings' ``:math:`` and
``.. math::`` after ``docs/rst_docstrings.py``) leaves pymdownx.arithmatex as
LaTeX in ``<span class="arithmatex">`` and ``<div class="arithmatex">``;
:func:`on_page_content` converts each to MathML with latex2mathml, so the
site draws its equations without a script or a network (Chromium, Firefox and
Safari render MathML). LaTeX that latex2mathml cannot read fails the build.
"""

import glob
import html
import os
import re

import latex2mathml.converter
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "repository/"
# Repository files (globs) that the pages may link to.
REPOSITORY_FILES = ("experiments/*.md", "experiments/digits/README.md", "experiments/lm/*.md",
                    "experiments/lm/figures/*.png",
                    "experiments/figures/**/*.png", "benchmarks/*.md",
                    "benchmarks/scaling/*")
_LINK = re.compile(r"(\]\()((?:\.\./)+)([^)#\s]+)")


def on_files(files, config):
  for pattern in REPOSITORY_FILES:
    for path in sorted(glob.glob(os.path.join(ROOT, pattern), recursive=True)):
      uri = PREFIX + os.path.relpath(path, ROOT).replace(os.sep, "/")
      files.append(File.generated(config, uri, abs_src_path=path))
  return files


def on_page_markdown(markdown, page, config, files):
  depth = page.file.src_uri.count("/")  # folders between docs/ and the page

  def to_site(match):
    opening, ups, path = match.groups()
    if page.file.src_uri.startswith(PREFIX):  # a repository file: its links stay inside
      return match.group(0)
    if ups != "../" * (depth + 1) or files.get_file_from_path(PREFIX + path) is None:
      return match.group(0)
    return opening + "../" * depth + PREFIX + path

  return _LINK.sub(to_site, markdown)


# arithmatex's generic output: \( \) inline, \[ \] for a block, HTML-escaped.
_MATH = re.compile(r'<(span|div) class="arithmatex">\\([(\[])(.*?)\\[)\]]</\1>', re.S)


def to_mathml(tex, display):
  """``tex`` as a ``<math>`` element (``display``: "block" or "inline")."""
  try:
    mathml = latex2mathml.converter.convert(tex.strip(), display=display)
  except Exception as error:  # latex2mathml raises its own exceptions and plain ones
    raise PluginError(f"latex2mathml cannot convert {tex!r}: {error}") from error
  if "\\" in mathml:  # a command it does not know stays as text: "\\v" in an <mi>
    raise PluginError(f"latex2mathml left LaTeX in the MathML of {tex!r}: {mathml}")
  return mathml


def on_page_content(content, page, config, files):
  def convert(match):
    element, opening, tex = match.groups()
    display = "block" if opening == "[" else "inline"
    mathml = to_mathml(html.unescape(tex), display)
    return f'<div class="math">{mathml}</div>' if element == "div" else mathml

  return _MATH.sub(convert, content)
