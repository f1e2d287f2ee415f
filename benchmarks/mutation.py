"""Mutation testing of the library with mutmut: ``python -m benchmarks.mutation``.

Copies the tracked files to a scratch folder, adds a ``[mutmut]`` section to its
setup.cfg (the modules below, the fast tests, a fork server so that JAX is imported
once), runs ``mutmut run`` there and writes ``benchmarks/MUTATION.md``: per module
the mutants killed and survived, the score, and every surviving mutant with its
diff, marked equivalent (with the reason, from :data:`EQUIVALENT`) or not. Not part
of CI (an hour on a 2-core CPU); run it after a change to the mathematics.

::

  pip install mutmut
  python -m benchmarks.mutation                       # every module below
  python -m benchmarks.mutation --modules=sphere,metrics --report=/tmp/m.md
  # a report over runs made in several sittings (each module from the last folder
  # where its mutants ran), without running mutmut again:
  python -m benchmarks.mutation --report_only --workdir=/tmp/b --merge=/tmp/a
  # modules with no folder keep their row and survivors from the committed report:
  python -m benchmarks.mutation --report_only --workdir=/tmp/b --keep_previous

Statements starting with ``raise`` or a ``logging.`` call are not mutated: their
strings are messages, and the conditions that raise are mutated where they are
written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

MODULES = ("groups", "detect", "penalty", "rescale", "sphere", "optimizers", "metrics",
           "theory", "reductions", "angular")
TESTS = ("tests/test_transforms.py", "tests/test_references.py", "tests/test_groups.py",
         "tests/test_detect.py", "tests/test_theory.py", "tests/test_setups.py",
         "tests/test_equivalences.py", "tests/test_goldens.py", "tests/test_reductions.py",
         "tests/test_angular.py")
# Imported once by mutmut's fork server: none of them starts JAX's backend on import.
PRELOAD = ("numpy", "jax", "jax.numpy", "optax", "chex", "flax.nnx", "pytest")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KILLED = (1, 2)  # pytest's exit codes: tests failed, collection failed
# Surviving mutants that cannot change any result, by mutmut's name, with why. Reviewed by
# hand; a new survivor is not equivalent until it is listed here.
EQUIVALENT_FILE = os.path.join(REPO, "benchmarks", "mutation_equivalent.json")
# How the report's runs were made and what they found, written by hand: copied into the
# report between its header and its table.
NOTES_FILE = os.path.join(REPO, "benchmarks", "mutation_notes.md")
COUNTS = ("mutants", "killed", "survived", "equivalent", "other", "not_run")

def define_flags() -> None:
  """This command's flags: defined when it runs, not on import (flag names repeat)."""
  flags.DEFINE_list("modules", list(MODULES), "normreg modules to mutate.")
  flags.DEFINE_string("report", os.path.join(REPO, "benchmarks", "MUTATION.md"),
                      "Where the report goes.")
  flags.DEFINE_string("workdir", None, "Scratch folder (default: a new temporary "
                      "one); a rerun on the same folder reuses mutmut's cache.")
  flags.DEFINE_integer("max_children", os.cpu_count() or 1,
                       "Mutants tested in parallel.")
  flags.DEFINE_list("merge", [], "Scratch folders of earlier runs: the report takes each "
                    "module from the last of these folders and --workdir where it ran.")
  flags.DEFINE_bool("report_only", False, "Write the report from --workdir and --merge "
                    "without running mutmut.")
  flags.DEFINE_integer("sample", 0, "Run only this many mutants of --modules, drawn "
                       "uniformly without replacement (--sample_seed): a score estimate "
                       "where running them all does not fit; the rest are 'not run'.")
  flags.DEFINE_integer("sample_seed", 0, "Seed of --sample's draw.")
  flags.DEFINE_bool("keep_previous", False, "A module with no results in --workdir or "
                    "--merge keeps its row and surviving mutants from the report --report "
                    "names (as it was before this run overwrites it).")


def prepare(workdir: str, modules) -> None:
  files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.split()
  for name in files:
    os.makedirs(os.path.join(workdir, os.path.dirname(name)), exist_ok=True)
    shutil.copy2(os.path.join(REPO, name), os.path.join(workdir, name))
  with open(os.path.join(workdir, "setup.cfg"), "a") as f:
    f.write("\n[mutmut]\nsource_paths = normreg/\n")
    f.write("only_mutate =\n" + "".join(f"    normreg/{m}.py\n" for m in modules))
    f.write("pytest_add_cli_args_test_selection =\n" + "".join(f"    {t}\n" for t in TESTS))
    # One argument a line: mutmut passes each line to pytest as one argv entry.
    f.write("pytest_add_cli_args =\n" + "".join(
        f"    {a}\n" for a in ("-p", "no:cacheprovider", "-q", "-x", "-m", "not slow")))
    f.write("do_not_mutate_patterns =\n    ^\\s*raise \\b\n    logging\\.\n")
    # mutmut runs the tests in mutants/ with the scratch root off sys.path; without its
    # own copy there, `experiments` (imported by some tests) would come from wherever an
    # editable install of normreg points. normreg itself comes from mutants/ (first on
    # sys.path), as mutmut checks.
    f.write("also_copy =\n    experiments/\n")
    # The fork server imports JAX but never starts its backend (XLA's threads do not
    # survive a fork); each mutant's process compiles through one persistent cache, and
    # its time limit allows for the imports and compiles (15x its tests' time + 60 s).
    f.write("process_isolation = forkserver\nforkserver_warmup = import\n"
            "preload_modules_file = mutmut_preload.txt\ntimeout_constant = 60\n")
  with open(os.path.join(workdir, "mutmut_preload.txt"), "w") as f:
    f.write("\n".join(PRELOAD) + "\n")


def collect(workdir: str) -> dict[str, dict[str, int | None]]:
  """``{module: {mutant: exit code}}`` from mutmut's ``.meta`` files: pytest's exit code (1
  a test failed, 2 collection failed: both killed; 0 survived), None not run, mutmut's own
  codes (timeout, crash) otherwise."""
  out = {}
  for name in sorted(os.listdir(os.path.join(workdir, "mutants", "normreg"))):
    if name.endswith(".py.meta"):
      with open(os.path.join(workdir, "mutants", "normreg", name)) as f:
        out[name[:-len(".py.meta")]] = json.load(f)["exit_code_by_key"]
  return out


def collect_runs(workdirs, modules) -> dict[str, tuple[str, dict[str, int | None]]]:
  """``{module: (workdir, {mutant: exit code})}`` for ``modules``, each from the last of
  ``workdirs`` in which at least one of its mutants ran, in the order of ``modules``."""
  found = {}
  for workdir in workdirs:
    for module, codes in collect(workdir).items():
      if any(v is not None for v in codes.values()):
        found[module] = (workdir, codes)
  return {m: found[m] for m in modules if m in found}


def previous_rows(path: str, modules) -> dict[str, tuple[dict[str, int], list[str]]]:
  """``{module: (counts, survivor sections)}`` for ``modules`` from an earlier report at
  ``path``: the numbers of its table row (:data:`COUNTS`) and the text of each of its
  surviving mutants' sections, as written then."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    text = f.read()
  out = {}
  for line in text.splitlines():
    m = re.fullmatch(r"\| (\w+) \|((?: \d+ \|){6}) [\d.]+% \|", line)
    if m and m.group(1) in modules:
      out[m.group(1)] = (dict(zip(COUNTS, map(int, m.group(2).replace("|", " ").split()))), [])
  survivors = text.split("\n## Surviving mutants\n", 1)[1] if "\n## Surviving mutants\n" in (
      text) else ""
  for section in re.split(r"\n(?=### `)", survivors):
    m = re.match(r"### `normreg\.(\w+)\.", section)
    if m and m.group(1) in out:
      out[m.group(1)][1].append(section.strip("\n"))
  return out


def diff_of(workdir: str, mutant: str) -> str:
  shown = subprocess.run([sys.executable, "-m", "mutmut", "show", mutant], cwd=workdir,
                         capture_output=True, text=True).stdout
  return "\n".join(l for l in shown.splitlines()[1:] if l.startswith(("+", "-", "@")) and
                   not l.startswith(("+++", "---")))


def write_report(results, equivalent: dict[str, str], path: str, seconds: float | None,
                 command: str, missing=(), previous=None, notes: str = "",
                 modules=None) -> dict:
  """Writes the report from :func:`collect_runs`' results and the rows kept from an
  earlier report (:func:`previous_rows`), in the order of ``modules``; returns the
  totals and score."""
  previous = previous or {}
  modules = list(modules or [*results, *previous])
  took = (f", {seconds / 60:.0f} minutes on {os.cpu_count()} CPU cores" if seconds is not None
          else ", from the results of earlier runs")
  lines = ["# Mutation testing of normreg", "",
           f"- Command: `{command}` (mutmut {_mutmut_version()}){took}.",
           f"- Tests: {', '.join(f'`{t}`' for t in TESTS)}, without the `slow` ones.",
           "- Not mutated: statements starting with `raise` or a `logging.` call (messages).",
           "- Killed: a test failed (pytest exit 1) or the tests could not be collected (exit "
           "2: a test parametrized by a mutated function's value).",
           "- Score: killed / (mutants run - equivalent survivors). Equivalent survivors are "
           f"listed, with why, in `{os.path.relpath(EQUIVALENT_FILE, REPO)}`."]
  kept = [m for m in modules if m in previous and m not in results]
  if kept:
    lines.append(f"- Rows kept from the earlier report, as it gave them (their runs' folders "
                 f"are not here): {', '.join(kept)}.")
  if notes:
    lines += ["", notes.strip("\n")]
  lines += ["", "| module | mutants | killed | survived | equivalent | timeouts/crashes | not run "
            "| score |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  totals = dict.fromkeys(COUNTS, 0)
  survivors = []
  for module in modules:
    if module in results:
      workdir, codes = results[module]
      ran = {k: v for k, v in codes.items() if v is not None}
      killed = sum(v in KILLED for v in ran.values())
      survived = [k for k, v in ran.items() if v == 0]
      eq = [k for k in survived if k in equivalent]
      counts = dict(mutants=len(ran), killed=killed, survived=len(survived), equivalent=len(eq),
                    other=len(ran) - killed - len(survived), not_run=len(codes) - len(ran))
      survivors += [(workdir, k) for k in survived]
    elif module in previous:
      counts, sections = previous[module]
      survivors += [(None, section) for section in sections]
    else:
      continue
    score = counts["killed"] / max(counts["mutants"] - counts["equivalent"], 1)
    lines.append(f"| {module} | " + " | ".join(str(counts[k]) for k in COUNTS) +
                 f" | {100 * score:.1f}% |")
    for k in COUNTS:
      totals[k] += counts[k]
  score = totals["killed"] / max(totals["mutants"] - totals["equivalent"], 1)
  lines += [f"| **all** | {totals['mutants']} | {totals['killed']} | {totals['survived']} | "
            f"{totals['equivalent']} | {totals['other']} | {totals['not_run']} | "
            f"**{100 * score:.1f}%** |", ""]
  if missing:
    lines += [f"- **No results for {', '.join(missing)}**: not part of this report.", ""]
  lines += ["## Surviving mutants", ""]
  for workdir, mutant in survivors:
    if workdir is None:  # kept from the earlier report as it was written
      lines += [mutant, ""]
      continue
    why = equivalent.get(mutant)
    lines += [f"### `{mutant}`: {'equivalent: ' + why if why else '**not equivalent**'}", "",
              "```diff", diff_of(workdir, mutant), "```", ""]
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return {**totals, "score": score}


def sample(workdir: str, modules, k: int, seed: int, env: dict[str, str]) -> list[str]:
  """``k`` mutants of ``modules`` drawn uniformly without replacement (``random.sample``,
  ``seed``), from the names mutmut generated: a run with a pattern that matches no mutant
  only generates them (and times the clean tests)."""
  subprocess.run([sys.executable, "-m", "mutmut", "run", "normreg.no_such_module.*"],
                 cwd=workdir, check=False, stdout=subprocess.DEVNULL, env=env)
  return draw(collect(workdir), modules, k, seed)


def draw(codes: dict[str, dict[str, int | None]], modules, k: int, seed: int) -> list[str]:
  """``k`` of the mutants of ``modules`` in ``codes`` (:func:`collect`'s), drawn uniformly
  without replacement by ``random.Random(seed).sample`` over their sorted names."""
  names = sorted(n for module, c in codes.items() if module in modules for n in c)
  if k > len(names):
    sys.exit(f"benchmarks.mutation: error: --sample={k} is more than the {len(names)} "
             f"mutants of {', '.join(modules)}.")
  return random.Random(seed).sample(names, k)


def _mutmut_version() -> str:
  try:
    import mutmut  # pylint: disable=g-import-not-at-top
    return mutmut.__version__
  except (ImportError, AttributeError):
    return "?"


FLAGS = flags.FLAGS


def main(argv):
  del argv
  unknown = set(FLAGS.modules) - set(MODULES)
  if unknown:
    sys.exit(f"benchmarks.mutation: error: --modules: {sorted(unknown)} are not among "
             f"{', '.join(MODULES)}.")
  if importlib.util.find_spec("mutmut") is None:
    sys.exit("benchmarks.mutation: error: mutmut is not installed: pip install mutmut")
  for workdir in FLAGS.merge + ([FLAGS.workdir] if FLAGS.report_only else []):
    if not os.path.isdir(os.path.join(workdir or "", "mutants", "normreg")):
      sys.exit(f"benchmarks.mutation: error: --{'merge' if workdir in FLAGS.merge else 'workdir'}"
               f"={workdir} holds no mutmut results (no mutants/normreg folder).")
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="normreg-mutation-")
  seconds = None
  if not FLAGS.report_only:
    if not os.path.exists(os.path.join(workdir, "setup.cfg")):
      prepare(workdir, FLAGS.modules)
    start = time.perf_counter()
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(workdir, "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    # Every mutant's process imports the mutated modules (angular.py holds its 1,300
    # mutants: 90,000 lines, a second to compile): compiled once into __pycache__.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    names = [f"normreg.{m}.*" for m in FLAGS.modules]
    if FLAGS.sample:
      names = sample(workdir, FLAGS.modules, FLAGS.sample, FLAGS.sample_seed, env)
    subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children",
                    str(FLAGS.max_children), *names],
                   cwd=workdir, check=False, stdout=subprocess.DEVNULL, env=env)
    seconds = time.perf_counter() - start
  equivalent = {}
  if os.path.exists(EQUIVALENT_FILE):
    with open(EQUIVALENT_FILE) as f:
      equivalent = json.load(f)
  command = "python -m benchmarks.mutation " + " ".join(
      a for a in sys.argv[1:] if not re.match(r"--(workdir|report|merge)\b", a))
  results = collect_runs(FLAGS.merge + [workdir], FLAGS.modules)
  previous = previous_rows(FLAGS.report, [m for m in FLAGS.modules if m not in results]) if (
      FLAGS.keep_previous) else {}
  missing = [m for m in FLAGS.modules if m not in results and m not in previous]
  notes = ""
  if os.path.exists(NOTES_FILE):
    with open(NOTES_FILE) as f:
      notes = f.read()
  totals = write_report(results, equivalent, FLAGS.report, seconds, command.strip(), missing,
                        previous, notes, FLAGS.modules)
  print(json.dumps(totals))
  print(f"report: {FLAGS.report}; mutants in {workdir}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
