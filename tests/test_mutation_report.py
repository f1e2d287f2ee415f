"""benchmarks.mutation's report: results merged from several runs, counted as documented."""

import importlib.util
import json
import os

# By path: `pytest` does not put the repository root (benchmarks' parent) on sys.path.
_SPEC = importlib.util.spec_from_file_location("benchmarks_mutation", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "mutation.py"))
mutation = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(mutation)


def _run(root, name, modules):
  folder = os.path.join(root, name, "mutants", "normreg")
  os.makedirs(folder)
  for module, codes in modules.items():
    with open(os.path.join(folder, f"{module}.py.meta"), "w") as f:
      json.dump({"exit_code_by_key": codes}, f)
  return os.path.join(root, name)


def test_runs_merge_and_the_score_counts_as_documented(tmp_path):
  m = "normreg.sphere.x_f__mutmut_"
  old = _run(tmp_path, "old", {"sphere": {m + "1": 0, m + "2": 0}, "theory": {"t": None}})
  new = _run(tmp_path, "new", {"sphere": {m + "1": 1, m + "2": 2, m + "3": 0, m + "4": None,
                                          m + "5": 255},
                               "groups": {"g": None}})
  results = mutation.collect_runs([old, new], ["groups", "sphere", "theory"])
  # groups and theory never ran anywhere; sphere comes from the later folder
  assert list(results) == ["sphere"] and results["sphere"][0] == new
  report = tmp_path / "report.md"
  totals = mutation.write_report(results, {m + "3": "a reason"}, str(report), None, "cmd",
                                 ["groups", "theory"])
  # killed: exit 1 and 2; survived 1, equivalent; one crash; one not run
  assert totals == dict(mutants=4, killed=2, survived=1, equivalent=1, other=1, not_run=1,
                        score=2 / 3)
  text = report.read_text()
  assert "| sphere | 4 | 2 | 1 | 1 | 1 | 1 | 66.7% |" in text
  assert "No results for groups, theory" in text
  assert f"`{m}3`: equivalent: a reason" in text
