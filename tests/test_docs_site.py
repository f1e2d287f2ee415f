"""The built documentation site shows the docstrings' reStructuredText rendered.

normreg's docstrings carry ``.. math::`` blocks, inline ``:math:`` and Sphinx's
roles (``:func:`` and the like); ``docs/rst_docstrings.py`` rewrites them for
mkdocs and ``docs/hooks.py`` turns the LaTeX into MathML. These tests build the
site (``mkdocs build --strict``, about 3 s) and read its HTML:

- no page shows a raw marker (``.. math::``, a role, ``$$``, a LaTeX command
  such as ``\\frac``) outside code and equations;
- each documented object's section has as many displayed and inline equations
  as its docstring has ``.. math::`` blocks and ``:math:`` roles, and at least
  as many links as roles, counted here from the source (``__doc__``) rather
  than from what mkdocstrings read; every docstring of the package that holds
  an equation is on some API page;
- every cross-reference link of the site leads to an element that exists.

They skip only where mkdocs is not installed (``pip install -e ".[docs]"``);
CI installs it and runs this file in its docs step, failing unless it passed.
"""

from __future__ import annotations

import ast
import html.parser
import importlib
import inspect
import os
import pathlib
import re
import subprocess
import sys
import urllib.parse

import pytest

pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install -e '.[docs]')")

ROOT = pathlib.Path(__file__).resolve().parent.parent
API_PAGES = sorted(p.stem for p in (ROOT / "docs" / "api").glob("*.md"))
ROLE = re.compile(r":(?:py:)?(?:func|class|mod|data|meth|attr|obj|exc|const):`[^`]+`")
MATH_BLOCK = re.compile(r"^\s*\.\. math::", re.M)
MATH_ROLE = re.compile(r":math:`")
# What must not be seen outside code and equations: reStructuredText's markers, arithmatex's
# delimiters (math that was not converted), a LaTeX command, an unresolved autorefs link.
RAW = re.compile(r"\.\. [a-z]+::|:[a-z]+:`|:(?:py:)?(?:func|class|mod|math|data|meth|attr):"
                 r"|\$\$|\\[(\[\])]|\\[A-Za-z]+|\]\[normreg\.")
HEADING = re.compile(r'<h([1-6]) id="([^"]+)" class="doc doc-heading"')


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  """The site, built from the checkout with ``mkdocs build --strict``."""
  out = tmp_path_factory.mktemp("site")
  subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                  "--site-dir", str(out)], cwd=ROOT, check=True,
                 env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
  return out


def _pages(site):
  return sorted(site.rglob("*.html"))


class _VisibleText(html.parser.HTMLParser):
  """The text of a page outside code, equations, scripts and styles."""

  HIDDEN = {"code", "pre", "kbd", "math", "script", "style"}

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.hidden = 0
    self.parts = []

  def handle_starttag(self, tag, attrs):
    self.hidden += tag in self.HIDDEN

  def handle_endtag(self, tag):
    self.hidden -= tag in self.HIDDEN

  def handle_data(self, data):
    if not self.hidden:
      self.parts.append(data)


class _EquationText(_VisibleText):
  """The text inside the page's equations (``<math>`` elements)."""

  def handle_starttag(self, tag, attrs):
    self.hidden += tag == "math"

  def handle_endtag(self, tag):
    self.hidden -= tag == "math"

  def handle_data(self, data):
    if self.hidden:
      self.parts.append(data)


def visible_text(page_html, parser=None):
  parser = parser or _VisibleText()
  parser.feed(page_html)
  return "".join(parser.parts)


def test_the_scan_sees_raw_restructuredtext():
  """The scan below on the HTML that mkdocstrings made of the docstrings before they were
  rewritten (a raw directive, a role before its code, LaTeX as text) and on rendered
  HTML: a scan that found nothing anywhere would pass an unrendered site."""
  raw = ('<p>.. math::</p>\n<p>u_i \\leftarrow u_i + 2 \\lambda w_i</p>'
         '<p>(:func:<code>normreg.sliced</code>)</p>')
  assert RAW.findall(visible_text(raw)) == [".. math::", "\\leftarrow", "\\lambda", ":func:"]
  rendered = ('<p><math display="block"><mi>\\frac</mi></math> and <code>:func:`x`</code>'
              ' and <a href="#normreg.sliced"><code>sliced()</code></a></p>')
  assert not RAW.findall(visible_text(rendered))


def test_no_page_shows_raw_restructuredtext_or_latex(site):
  found = {}
  for page in _pages(site):
    hits = RAW.findall(visible_text(page.read_text(encoding="utf-8")))
    if hits:
      found[str(page.relative_to(site))] = sorted(set(hits))
  assert not found, f"raw markers outside code and equations: {found}"


def test_no_equation_shows_latex(site):
  """latex2mathml writes a command it does not know as text (``\\v`` where a line ended in
  LaTeX's control space ``\\`` and met the next): no equation holds a backslash."""
  assert "\\v" in visible_text("<p><math><mi>\\v</mi></math></p>", _EquationText())
  found = {}
  for page in _pages(site):
    text = visible_text(page.read_text(encoding="utf-8"), _EquationText())
    if "\\" in text:
      found[str(page.relative_to(site))] = re.findall(r".{0,20}\\.{0,20}", text)
  assert not found, f"LaTeX left inside equations: {found}"


def _object(path):
  """The Python object of a heading id such as ``normreg.groups.Group.reduced_axes``."""
  parts = path.split(".")
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:i]))
    except ImportError:
      continue
    for name in parts[i:]:
      obj = inspect.getattr_static(obj, name)
    return obj
  raise ImportError(path)


def _docstrings(obj):
  """The docstrings mkdocstrings shows in ``obj``'s section (a class's ``__init__`` too, as
  ``merge_init_into_class`` does), or None for an object that has no docstring of its own
  (a constant: its ``__doc__`` is its type's)."""
  if isinstance(obj, (staticmethod, classmethod)):
    obj = obj.__func__
  if isinstance(obj, property):
    obj = obj.fget
  if not (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj)):
    return None
  docs = [obj.__doc__ or ""]
  if inspect.isclass(obj) and "__init__" in vars(obj):
    docs.append(vars(obj)["__init__"].__doc__ or "")
  return "\n".join(docs)


def _sections(page_html):
  """``{heading id: html}``: each documented object's heading up to the next one."""
  headings = list(HEADING.finditer(page_html))
  ends = [h.start() for h in headings[1:]] + [len(page_html)]
  return {h.group(2): page_html[h.start():end] for h, end in zip(headings, ends)}


@pytest.mark.parametrize("name", API_PAGES)
def test_each_docstring_shows_its_equations_and_links(site, name):
  """An object's section has one displayed equation per ``.. math::`` block of its docstring
  and one inline equation per ``:math:`` role (a block left as text, or turned into a
  paragraph, shows none), and a link per role at least (a role left as code shows none)."""
  page_html = (site / "api" / name / "index.html").read_text(encoding="utf-8")
  sections = _sections(page_html)
  assert sections, f"api/{name}: no documented object found"
  wrong, docstring_equations = [], 0
  for path, section in sections.items():
    doc = _docstrings(_object(path))
    if doc is None:
      continue
    want = (len(MATH_BLOCK.findall(doc)), len(MATH_ROLE.findall(doc)), len(ROLE.findall(doc)))
    got = (section.count('<math xmlns="http://www.w3.org/1998/Math/MathML" display="block"'),
           section.count('<math xmlns="http://www.w3.org/1998/Math/MathML" display="inline"'),
           section.count('<a class="autorefs autorefs-internal"'))
    docstring_equations += want[0] + want[1]
    if got[:2] != want[:2] or got[2] < want[2]:
      wrong.append(f"{path}: (block, inline, links) {got} for a docstring with {want}")
  assert not wrong, "\n".join(wrong)
  if docstring_equations:  # the page as a reader sees it: its docstrings' math is drawn
    assert "<math" in page_html and "arithmatex" not in page_html


def _documented_objects(site):
  return {id(_object(path)) for name in API_PAGES
          for path in _sections((site / "api" / name / "index.html").read_text("utf-8"))}


def test_every_docstring_with_an_equation_is_on_an_api_page(site):
  """Found from the source by ``ast``: a module, class or function whose docstring holds a
  ``.. math::`` block or ``:math:`` is documented on some API page (an equation that no page
  shows is not rendered either). Private objects (a name with ``_``) are exempt."""
  documented = _documented_objects(site)
  missing = []
  for source in sorted((ROOT / "normreg").rglob("*.py")):
    module = ".".join(source.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")

    def visit(node, qualname):
      doc = ast.get_docstring(node, clean=False) or ""
      public = not any(part.startswith("_") for part in qualname.split(".") if part)
      if public and (MATH_BLOCK.search(doc) or MATH_ROLE.search(doc)):
        path = ".".join(filter(None, [module, qualname]))
        if id(_object(path)) not in documented:
          missing.append(path)
      for child in getattr(node, "body", []):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
          visit(child, ".".join(filter(None, [qualname, child.name])))

    visit(ast.parse(source.read_text(encoding="utf-8")), "")
  assert not missing, f"docstrings with equations on no API page: {missing}"


def test_every_cross_reference_leads_to_an_element(site):
  """Each autorefs link (a role's, a page's ``[name][normreg.x]``) points at a page of the
  site and an id on it; the docstrings' roles are most of them."""
  ids = {}
  links = 0
  broken = []
  for page in _pages(site):
    for href in re.findall(r'<a class="autorefs autorefs-internal"[^>]* href="([^"]*)"',
                           page.read_text(encoding="utf-8")):
      links += 1
      url = urllib.parse.urlparse(href)
      target = (page.parent / url.path).resolve() if url.path else page
      if target.is_dir():
        target = target / "index.html"
      if target not in ids:
        ids[target] = (set(re.findall(r'\bid="([^"]+)"', target.read_text(encoding="utf-8")))
                       if target.is_file() else None)
      if ids[target] is None or (url.fragment and url.fragment not in ids[target]):
        broken.append(f"{page.relative_to(site)}: {href}")
  assert links > 100, f"only {links} cross-reference links in the site"
  assert not broken, f"links to nothing: {broken}"
