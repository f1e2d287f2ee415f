"""benchmarks.mutation's report: results merged from several runs, counted as documented."""

import importlib.util
import json
import os

import pytest

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


OLD_REPORT = """# Mutation testing of normreg

| module | mutants | killed | survived | equivalent | timeouts/crashes | not run | score |
| --- | --- | --- | --- | --- | --- | --- | --- |
| groups | 10 | 8 | 2 | 1 | 0 | 0 | 88.9% |
| sphere | 4 | 4 | 0 | 0 | 0 | 0 | 100.0% |
| **all** | 14 | 12 | 2 | 1 | 0 | 0 | **92.3%** |

## Surviving mutants

### `normreg.groups.x_g__mutmut_1`: equivalent: a reason

```diff
-a
+b
```

### `normreg.groups.x_g__mutmut_2`: **not equivalent**

```diff
-c
+d
```
"""


def test_rows_are_kept_from_an_earlier_report_where_no_run_folder_is_left(tmp_path):
  old = tmp_path / "old.md"
  old.write_text(OLD_REPORT)
  kept = mutation.previous_rows(str(old), ["groups", "theory"])
  sections = OLD_REPORT.split("## Surviving mutants\n\n")[1].strip("\n").split("\n\n### ")
  assert kept == {"groups": (dict(mutants=10, killed=8, survived=2, equivalent=1, other=0,
                                  not_run=0),
                             [sections[0], "### " + sections[1]])}
  m = "normreg.sphere.x_f__mutmut_"
  results = mutation.collect_runs([_run(tmp_path, "new", {"sphere": {m + "1": 1, m + "2": 1}})],
                                  ["groups", "sphere", "theory"])
  report = tmp_path / "report.md"
  totals = mutation.write_report(results, {}, str(report), None, "cmd", ["theory"], kept,
                                 "How the runs were made.", ["groups", "sphere", "theory"])
  assert totals == dict(mutants=12, killed=10, survived=2, equivalent=1, other=0, not_run=0,
                        score=10 / 11)
  text = report.read_text()
  assert ("| groups | 10 | 8 | 2 | 1 | 0 | 0 | 88.9% |\n"
          "| sphere | 2 | 2 | 0 | 0 | 0 | 0 | 100.0% |\n"
          "| **all** | 12 | 10 | 2 | 1 | 0 | 0 | **90.9%** |") in text
  assert "Rows kept from the earlier report, as it gave them (their runs' folders are not " \
         "here): groups." in text
  assert "\nHow the runs were made.\n" in text and "No results for theory" in text
  assert text.endswith(OLD_REPORT.split("## Surviving mutants\n\n")[1])


def test_a_sample_is_drawn_without_replacement_from_the_modules_named():
  codes = {"angular": {f"normreg.angular.x_f__mutmut_{i}": None for i in range(1, 41)},
           "sphere": {f"normreg.sphere.x_g__mutmut_{i}": None for i in range(1, 41)}}
  drawn = mutation.draw(codes, ["angular"], 12, seed=3)
  assert len(set(drawn)) == 12 and all(n.startswith("normreg.angular.") for n in drawn)
  assert drawn == mutation.draw(codes, ["angular"], 12, seed=3)
  assert drawn != mutation.draw(codes, ["angular"], 12, seed=4)
  # Over many seeds every mutant is drawn about equally often (uniform, not the first k).
  counts = {}
  for seed in range(200):
    for n in mutation.draw(codes, ["angular"], 12, seed):
      counts[n] = counts.get(n, 0) + 1
  assert len(counts) == 40 and max(counts.values()) < 2.5 * 200 * 12 / 40
  with pytest.raises(SystemExit, match="--sample=41 is more than the 40 mutants of angular"):
    mutation.draw(codes, ["angular"], 41, seed=0)
