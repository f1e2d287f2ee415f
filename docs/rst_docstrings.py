"""A griffe extension: the docstrings' reStructuredText, as mkdocs' Markdown reads it.

normreg's docstrings are written as optax's are: Google sections (Args, Returns,
Examples) with reStructuredText inside them, ``.. math::`` blocks, inline
``:math:`` and Sphinx's Python roles (``:func:``, ``:class:``, ``:mod:``,
``:data:``, ``:meth:``, ``:attr:``). mkdocstrings reads Markdown, so before it
parses a docstring this extension rewrites, in every docstring of the package:

- a ``.. math::`` block into ``$$ ... $$`` and ``:math:`x``` into ``$x$``, which
  pymdownx.arithmatex keeps away from Markdown and ``docs/hooks.py`` turns into
  MathML when the page is built (no script, no network: browsers draw MathML);
- a role into an autorefs link to the object's canonical path,
  ``[`name`][normreg.module.name]``, resolved the way Sphinx's Python domain
  does: in the docstring owner's scope (its members and imports, then its
  parents'), then as a full dotted name; ``~`` shows the last component only,
  ``title <target>`` shows the title. A name that resolves to nothing in the
  package is a warning (so ``mkdocs build --strict`` fails on it) and stays code.

mkdocs.yml loads it with the Python handler's ``extensions`` option.
"""

from __future__ import annotations

import logging
import re

import griffe

logger = logging.getLogger("mkdocs.plugins.normreg.rst_docstrings")

ROLES = ("func", "class", "mod", "data", "meth", "attr", "obj", "exc", "const")
_ROLE = re.compile(r":(?:py:)?(" + "|".join(ROLES) + r"):`([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
# ``.. math::`` at some indentation, then its body: blank lines and lines indented deeper.
_MATH_BLOCK = re.compile(r"^([ \t]*)\.\. math::[ \t]*\n((?:[ \t]*\n|\1[ \t]+\S.*(?:\n|$))*)", re.M)
_TITLED = re.compile(r"^(.*\S)\s*<([^<>]+)>$", re.S)


def math_blocks(text: str) -> str:
  """``.. math::`` blocks as arithmatex's ``$$`` blocks, at the directive's indentation."""

  def block(match):
    indent, body = match.group(1), match.group(2)
    lines = [line.strip() for line in body.splitlines() if line.strip()]
    if not lines:
      raise ValueError(f"an empty '.. math::' block: {match.group(0)!r}")
    # One line: a line that ends in "\" (a control space) must not meet a newline.
    return f"{indent}$$\n{indent}{' '.join(lines)}\n{indent}$$\n\n"

  return _MATH_BLOCK.sub(block, text)


def math_roles(text: str) -> str:
  """Inline ``:math:`x``` as arithmatex's ``$x$``."""
  return _MATH_ROLE.sub(lambda m: "$" + m.group(1).strip() + "$", text)


def _canonical(obj: griffe.Object | griffe.Alias) -> str:
  try:
    return obj.final_target.path if obj.is_alias else obj.path
  except griffe.AliasResolutionError:
    return obj.target_path if obj.is_alias else obj.path


def resolve(owner: griffe.Object, name: str) -> str | None:
  """The canonical path of ``name`` as written in ``owner``'s docstring, or None."""
  head, _, rest = name.partition(".")
  scope = owner
  while scope is not None:  # the owner's scope, then its parents': members and imports
    if head in scope.members:
      found = scope.members[head]
      path = _canonical(found)
      break
    scope = scope.parent
  else:
    path = name  # a full dotted name
    rest = ""
  if rest:
    path = f"{path}.{rest}"
  try:
    obj = owner.modules_collection[path]
  except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
    return None
  return _canonical(obj)


def roles(text: str, owner: griffe.Object) -> str:
  """Sphinx's Python roles as autorefs links; a name that resolves to nothing warns."""

  def link(match):
    role, content = match.groups()
    titled = _TITLED.match(content)
    title, target = titled.groups() if titled else (None, content.strip())
    short = target.startswith("~")
    target = target.lstrip("~").lstrip(".")
    if title is None:
      title = target.rsplit(".", 1)[-1] if short else target
      if role in ("func", "meth"):
        title += "()"
    path = resolve(owner, target)
    if path is None:
      logger.warning(f"{owner.path}: :{role}:`{content}` resolves to nothing in the package")
      return f"`{title}`"
    return f"[`{title}`][{path}]"

  return _ROLE.sub(link, text)


def to_markdown(text: str, owner: griffe.Object) -> str:
  """A docstring's reStructuredText (math, roles) as Markdown."""
  return roles(math_roles(math_blocks(text)), owner)


class RstDocstrings(griffe.Extension):
  """Rewrites every docstring of a loaded package (see the module docstring)."""

  def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
    seen = set()

    def visit(obj):
      if obj.is_alias or id(obj) in seen:
        return
      seen.add(id(obj))
      if obj.docstring is not None:
        obj.docstring.value = to_markdown(obj.docstring.value, obj)
      for member in obj.members.values():
        visit(member)

    visit(pkg)
