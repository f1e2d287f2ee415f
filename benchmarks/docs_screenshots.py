"""The documentation site as a browser draws it: ``python -m benchmarks.docs_screenshots``.

Builds the site (``mkdocs build --strict`` into a temporary folder; ``--site=DIR``
takes one already built), serves it on 127.0.0.1 and has headless Chromium
screenshot, into the folder ``--out=DIR``:

- the home page and the transforms guide (``home.png``, ``guide-transforms.png``);
- every API page (``docs/api/*.md``): its top (``api-NAME.png``) and the object
  whose docstring holds the page's first displayed equation, scrolled to
  (``api-NAME-math.png``); ``--equations=all`` adds every object with one
  (``api-NAME-math-ID.png``);

then prints each PNG's path with what it should show. Nothing is checked here:
look at the pictures (``tests/test_docs_site.py`` checks the HTML). Chromium is
Debian's ``chromium`` package (``apt-get install -y chromium``; ``--chromium``
names another binary). It runs headless, without a network, a GPU or a sandbox,
in a fresh profile, so what it shows is what an offline reader sees; it is
driven over its DevTools pipe (``--remote-debugging-pipe``, no package needed),
because ``chromium --screenshot`` draws a blank page at a URL's ``#anchor``.
Needs the docs extra (``pip install -e ".[docs]"``).
"""

from __future__ import annotations

import base64
import fcntl
import functools
import glob
import http.server
import json
import os
import re
import subprocess
import sys
import tempfile
import threading

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars")
# The id of a heading, then (before the next heading) a displayed equation.
_HEADING_THEN_MATH = re.compile(
    r'<h[1-6] id="([^"]+)"(?:(?!<h[1-6] ).)*?<math[^>]*display="block"', re.S)
HEADER_PX = 60  # mkdocs-material's header, which stays on top of a scrolled page


def build(site: str) -> None:
  """``mkdocs build --strict`` of the checkout into ``site``."""
  subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                  "--site-dir", site], cwd=ROOT, check=True,
                 env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))


def pages(site: str, every_equation: bool) -> list[tuple[str, str, str | None, str]]:
  """``(png name, path in the site, element id or None, what it shows)`` per screenshot."""
  shots = [("home.png", "index.html", None, "the home page"),
           ("guide-transforms.png", "transforms/index.html", None, "the transforms guide")]
  for source in sorted(glob.glob(os.path.join(ROOT, "docs", "api", "*.md"))):
    name = os.path.splitext(os.path.basename(source))[0]
    path = f"api/{name}/index.html"
    shots.append((f"api-{name}.png", path, None, f"the top of API page {name}"))
    with open(os.path.join(site, path), encoding="utf-8") as f:
      ids = [m.group(1) for m in _HEADING_THEN_MATH.finditer(f.read())]
    for i, element in enumerate(ids if every_equation else ids[:1]):
      png = f"api-{name}-math.png" if i == 0 else f"api-{name}-math-{element}.png"
      shots.append((png, path, element, f"API page {name} at {element}, a displayed equation"))
  return shots


def _above_nine(fd: int) -> int:
  """``fd`` moved to the lowest free descriptor above 9."""
  moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
  os.close(fd)
  return moved


class Chromium:
  """Headless Chromium driven over its DevTools pipe (fds 3 and 4, messages ending in NUL)."""

  def __init__(self, binary: str, width: int, height: int):
    self._profile = tempfile.TemporaryDirectory()
    to_child, self._writer = os.pipe()
    self._reader, from_child = os.pipe()
    # Chromium reads --remote-debugging-pipe on fds 3 and 4: the pipes are moved above 9
    # first, so that putting one on 3 cannot overwrite the other.
    to_child, from_child = (_above_nine(end) for end in (to_child, from_child))
    self._pid = os.posix_spawnp(
        binary, [binary, *CHROMIUM_FLAGS, "--remote-debugging-pipe",
                 f"--user-data-dir={self._profile.name}", "about:blank"], os.environ,
        file_actions=[(os.POSIX_SPAWN_DUP2, to_child, 3), (os.POSIX_SPAWN_DUP2, from_child, 4),
                      (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                      (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)])
    os.close(to_child)
    os.close(from_child)
    self._buffer = b""
    self._next_id = 0
    self._session = None
    target = self.call("Target.createTarget", url="about:blank")["targetId"]
    self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    self.call("Page.enable")
    self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
              deviceScaleFactor=1, mobile=False)
    self.width, self.height = width, height

  def _message(self) -> dict:
    while b"\0" not in self._buffer:
      chunk = os.read(self._reader, 1 << 20)
      if not chunk:
        raise RuntimeError("Chromium closed its DevTools pipe")
      self._buffer += chunk
    message, self._buffer = self._buffer.split(b"\0", 1)
    return json.loads(message)

  def call(self, method: str, **params) -> dict:
    """Sends one command and returns its result (events met on the way are dropped)."""
    self._next_id += 1
    command = {"id": self._next_id, "method": method, "params": params}
    if self._session is not None:
      command["sessionId"] = self._session
    os.write(self._writer, json.dumps(command).encode() + b"\0")
    while True:
      message = self._message()
      if message.get("id") == self._next_id:
        if "error" in message:
          raise RuntimeError(f"{method}: {message['error']}")
        return message["result"]

  def wait_for(self, event: str) -> None:
    while self._message().get("method") != event:
      pass

  def screenshot(self, url: str, element: str | None, png: str) -> None:
    """``url`` in the window, scrolled to ``element`` (an id) when given, as ``png``."""
    self.call("Page.navigate", url=url)
    self.wait_for("Page.loadEventFired")
    if element is not None:
      found = self.call("Runtime.evaluate", returnByValue=True, expression=(
          f"(() => {{ const e = document.getElementById({json.dumps(element)});"
          f" if (!e) return false; window.scrollTo(0, e.getBoundingClientRect().top"
          f" + window.scrollY - {HEADER_PX + 10}); return true; }})()"))
      if not found["result"]["value"]:
        raise RuntimeError(f"no element {element!r} in {url}")
    # Fonts and layout settled, and the header's title done switching after the scroll.
    self.call("Runtime.evaluate", awaitPromise=True, expression=(
        "document.fonts.ready.then(() => new Promise(r => setTimeout(r, 500)))"))
    data = self.call("Page.captureScreenshot", format="png")["data"]
    with open(png, "wb") as f:
      f.write(base64.b64decode(data))

  def close(self) -> None:
    try:
      self.call("Browser.close")
    except RuntimeError:
      pass
    os.waitpid(self._pid, 0)
    os.close(self._writer)
    os.close(self._reader)
    self._profile.cleanup()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
  """Serves the site without a log line per request."""

  def log_message(self, *args):
    pass


def main(argv):
  del argv
  out = os.path.abspath(flags.FLAGS.out)
  os.makedirs(out, exist_ok=True)
  with tempfile.TemporaryDirectory() as scratch:
    site = flags.FLAGS.site
    if site is None:
      site = os.path.join(scratch, "site")
      build(site)
    handler = functools.partial(QuietHandler, directory=os.path.abspath(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    browser = Chromium(flags.FLAGS.chromium, flags.FLAGS.width, flags.FLAGS.height)
    try:
      base = f"http://127.0.0.1:{server.server_address[1]}/"
      for png, path, element, what in pages(site, flags.FLAGS.equations == "all"):
        target = os.path.join(out, png)
        browser.screenshot(base + path, element, target)
        print(f"{target}: {what}")
    finally:
      browser.close()
      server.shutdown()


if __name__ == "__main__":
  flags.DEFINE_string("out", None, "Folder for the PNGs.")
  flags.DEFINE_string("site", None, "A built site (default: build one with mkdocs).")
  flags.DEFINE_string("chromium", "chromium", "The Chromium binary.")
  flags.DEFINE_enum("equations", "first", ["first", "all"], "Per API page, screenshot the "
                    "object of its first displayed equation, or of every one.")
  flags.DEFINE_integer("width", 1280, "Window width, pixels.")
  flags.DEFINE_integer("height", 1000, "Window height, pixels.")
  flags.mark_flag_as_required("out")
  app.run(main)
