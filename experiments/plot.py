"""Plots of training runs: ``python -m experiments.plot WORKDIR [WORKDIR ...]``.

Reads what ``experiments.train`` writes into each run's WORKDIR and draws the
runs side by side with matplotlib (the Agg canvas, so no display is needed).

Flags: ``--out DIR`` (default: the first WORKDIR), ``--layers REGEX`` (layer
paths to draw, by ``re.search``; default all) and ``--label KEYS`` (the
comma-separated config keys that make each run's legend label; default
``method,lam,lr``; a run without config.json is named by its folder).

Input, per WORKDIR:

- ``config.json``: a flat JSON object of the run's settings, e.g.
  ``{"method": "l2", "lam": 0.0005, "lr": 0.1, "optimizer": "sgd", ...}``.
- ``metrics.jsonl``: one JSON object per line, of two kinds::

    {"kind": "train", "step": 100, "epoch": 0.64, "loss": 1.9, "grad_norm": 2.1,
     "learning_rate": 0.1,
     "layers": {"convs/0/kernel": {"norm": 1.3, "elr": 0.059, "angle": 0.012}, ...}}
    {"kind": "test", "step": 390, "epoch": 1, "loss": 1.5, "rmse": 0.45}

  Per grouped layer, ``norm`` is the mean unit weight norm, ``elr`` the mean
  effective learning rate (eta/||w||^2 for SGD, eta/||w|| for Adam) and
  ``angle`` the mean angle (radians) each unit turned in the last step;
  ``layers`` is ``{}`` for a network without normalization. Records come in
  step order; a resumed run may repeat steps, and the last record of a
  (kind, step) wins. Records of other kinds are ignored.

Output, in ``--out``:

- ``weight_norm.png``, ``effective_lr.png`` (log y), ``angular_update.png``
  (log y): one panel per layer against the step, one line per run. At most
  16 panels: with more layers, the first 15 are drawn and the last panel
  shows, per run, the median over the other layers. Skipped when no run has
  a grouped layer.
- The theory, dashed in the run's colour, for a run whose method has one
  (its entry in ``experiments.methods``, from ``normreg.theory``; see
  :func:`theory_lines`): on ``angular_update.png`` the angle per step at
  equilibrium (or the one the method sets) at each logged learning rate; on
  ``weight_norm.png`` and ``effective_lr.png`` a vertical line at the time
  constant ``tau`` of the norm's approach to equilibrium (the effective
  learning rate ``eta/||w||^p`` follows the norm; its equilibrium value needs
  the gradient norm, which the run does not log). The legend gives each
  line's formula and its value at the peak rate. A run without config.json,
  or whose method has no theory (``spherical``, ``none``, coupled L2 under
  Adam, ...), gets none.
- ``HEADLINE.png`` (the headline metric of the runs' task, ``experiments.tasks``)
  and ``loss.png``: train (thin lines) and test (thick
  lines with markers) against the epoch, one colour per run.

The functions below (:func:`read_run`, :func:`make_figures`,
:func:`plot_runs`) can be used without the command line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import statistics
from typing import Any, Optional, Sequence

from absl import app
from absl import flags
from etils import epath
import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from experiments import errors
from experiments import workdir as workdir_lib

DEFAULT_LABEL_KEYS = ("method", "lam", "lr")
MAX_PANELS = 16
# File name -> (record key, title, log y-scale).
LAYER_FIGURES = {
    "weight_norm.png": ("norm", "mean unit weight norm", False),
    "effective_lr.png": ("elr", "effective learning rate", True),
    "angular_update.png": ("angle", "angular update per step (rad)", True),
}
# The closed forms of normreg.theory that the methods' theory calls, as mathtext for the
# legend: lambda_wd = 2 lam (coupled L2), wd the decoupled decay, r AdamP's wd_ratio.
THEORY_FORMULAS = {
    "equilibrium_angle_sgd": r"\sqrt{2\eta\lambda_{wd}/(1+\mu)}",
    "equilibrium_angle_sgdw": r"\sqrt{2\eta\,wd\,(1-\mu)/(1+\mu)}",
    "equilibrium_angle_adamw": r"\sqrt{2\eta\,wd\,(1-\beta_1)/(1+\beta_1)}",
    "equilibrium_angle_adamp": r"\sqrt{2\eta\,wd\,r}",
    "equilibrium_angle_sgdp": r"\sqrt{2\eta\,wd\,r/(1-\mu)}",
    "angle_nero": r"\arctan\,\eta",
    "angle_adamh": r"\arctan\,\eta",
    "angle_rotational": r"\arctan\,\theta_{target}",
    "time_constant_sgd": r"(1-\mu)/(4\eta\lambda_{wd})",
    "time_constant_sgdw": r"1/(4\eta\,wd)",
    "time_constant_adamw": r"1/(2\eta\,wd)",
    "equilibrium_angle_muon": r"\sqrt{2\eta\,wd/S}",
    "time_constant_muon": r"1/(2\eta\,wd)",
}
# Record key of a layer figure -> the theory drawn on it.
THEORY_OF_KEY = {"angle": "angle", "norm": "time_constant", "elr": "time_constant"}
# Beside the loss, each run's task's headline metric gets a curve figure, HEADLINE.png.
CURVE_FIGURES = {"loss.png": ("loss", "loss")}

_OUT = flags.DEFINE_string("out", None, "Folder for the PNGs (created if missing); "
                           "default: the first WORKDIR.")
_LAYERS = flags.DEFINE_string("layers", None, "Regex (re.search) selecting the layer paths "
                              "to draw, e.g. 'convs/[0-2]/'; default: all.")
_LABEL = flags.DEFINE_string("label", ",".join(DEFAULT_LABEL_KEYS),
                             "Comma-separated config keys that make each run's legend label.")


@dataclasses.dataclass
class Run:
  """One run's settings and metrics, deduplicated and in step order."""

  workdir: str
  config: dict[str, Any]
  train: list[dict[str, Any]]
  test: list[dict[str, Any]]
  label: str

  def layer_names(self) -> list[str]:
    """The layer paths in the train records, in order of first appearance."""
    names = {}
    for record in self.train:
      names.update(dict.fromkeys(record.get("layers") or {}))
    return list(names)


# ------------------------------------------------------------------ reading

def read_config(workdir: str) -> dict[str, Any]:
  """``WORKDIR/config.json`` as a dict; ``{}`` if there is none."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    return {}
  try:
    config = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise errors.InputError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(config, dict):
    raise errors.InputError(f"{path}: expected a JSON object, got {type(config).__name__}")
  return config


def read_metrics(path: str) -> tuple[list[dict], list[dict]]:
  """The train and test records of a metrics.jsonl, last one per step, by step.

  A last line without its newline is being written (a live run) or was cut
  short (a killed one): it is skipped if it does not parse.
  """
  records: dict[tuple[str, int], dict] = {}
  lines = epath.Path(path).read_text().splitlines(keepends=True)
  if lines and not lines[-1].endswith("\n"):
    try:
      json.loads(lines[-1])
    except json.JSONDecodeError:
      lines.pop()
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    record = _parse_record(line, f"{path}:{number}")
    if record["kind"] in ("train", "test"):
      records[(record["kind"], record["step"])] = record
  if not records:
    raise errors.InputError(f"{path}: no train or test records")
  ordered = [records[key] for key in sorted(records, key=lambda k: k[1])]
  return ([r for r in ordered if r["kind"] == "train"],
          [r for r in ordered if r["kind"] == "test"])


def _parse_record(line: str, where: str) -> dict:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise errors.InputError(f"{where}: malformed line ({e.msg}): {line.strip()[:80]!r}") from None
  if not isinstance(record, dict) or "kind" not in record:
    raise errors.InputError(f"{where}: malformed line (not an object with a 'kind'): "
                     f"{line.strip()[:80]!r}")
  if not isinstance(record.get("step"), int):
    raise errors.InputError(f"{where}: malformed line (no integer 'step'): {line.strip()[:80]!r}")
  return record


def make_label(config: dict[str, Any], keys: Sequence[str], fallback: str) -> str:
  """``"method=l2, lam=0.0005, lr=0.1"`` from ``keys`` present (and not null) in ``config``.

  ``fallback`` when no key is there (e.g. a run without config.json).
  """
  parts = [f"{key}={_format_value(config[key])}" for key in keys
           if config.get(key) is not None]
  return ", ".join(parts) if parts else fallback


def _format_value(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:g}"
  return str(value)


def read_run(workdir: str, label_keys: Sequence[str] = DEFAULT_LABEL_KEYS) -> Run:
  """Reads one WORKDIR (config.json optional, metrics.jsonl required)."""
  if not epath.Path(workdir).is_dir():
    raise errors.MissingInputError(f"{workdir}: no such folder")
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if not epath.Path(metrics_path).exists():
    raise errors.MissingInputError(f"{metrics_path}: no such file (is {workdir} a training workdir?)")
  config = read_config(workdir)
  train, test = read_metrics(metrics_path)
  name = os.path.basename(os.path.normpath(workdir))
  return Run(workdir, config, train, test, make_label(config, label_keys, name))


def check_label_keys(runs: Sequence[Run], keys: Sequence[str]) -> None:
  """Raises if a ``--label`` key is in no run's config (a typo), unless no run has one."""
  known = {k for run in runs for k in run.config}
  missing = [k for k in keys if k not in known]
  if known and missing:
    raise errors.InputError(f"--label key(s) {', '.join(missing)} in no run's config.json; "
                     f"the keys are: {', '.join(sorted(known))}")


# ------------------------------------------------------------------- theory


@dataclasses.dataclass
class TheoryLine:
  """A method's theory for one run, as drawn.

  ``kind`` is ``"angle"`` (``values``: the angle per step, at each logged
  learning rate, at ``steps``) or ``"time_constant"`` (``values``: ``[tau]`` in
  steps, at ``config.lr``). ``label`` is the legend's text: the formula (mathtext)
  and its value at the peak rate.
  """

  kind: str
  steps: list[int]
  values: list[float]
  label: str


def _theory_and_formula(theory_fn, *args) -> tuple[Optional[float], Optional[str]]:
  """``theory_fn(*args)`` and its formula (``THEORY_FORMULAS`` of the closed form it names,
  ``experiments.methods.Closed``); ``(None, None)`` where theory has no closed form."""
  try:
    value = theory_fn(*args)
  except ValueError:  # e.g. coupled L2 under Adam: no time constant in normreg.theory
    return None, None
  if value is None or not math.isfinite(value):
    return None, None
  return value, THEORY_FORMULAS.get(getattr(value, "form", None))


def theory_lines(run: Run) -> dict[str, TheoryLine]:
  """The theory of ``run``'s method, ``{kind: TheoryLine}`` (``{}`` without one).

  From the method's entry in ``experiments.methods`` (``Method.theory_angle``,
  ``Method.theory_time_constant``, closed forms of ``normreg.theory``) and the run's
  ``config.json``; the angle at each train record's ``learning_rate`` (the grouped
  weights' rate that step). A run without a config (or a method in it), with one the
  launcher would not take, or of a method without a theory gets ``{}``.
  """
  from experiments import methods as methods_lib  # pylint: disable=import-outside-toplevel
  from experiments.config import Config  # pylint: disable=import-outside-toplevel
  if "method" not in run.config:  # no config.json (its defaults would be a guess)
    return {}
  try:  # keys left out take the launcher's defaults, as its flags do
    config = Config.from_dict(run.config)
    method = methods_lib.get(config.method)
  except (ValueError, TypeError, KeyError):
    return {}
  lines = {}
  rates = [(r["step"], r.get("learning_rate")) for r in run.train]
  rates = [(step, float(rate)) for step, rate in rates
           if isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0]
  if rates:
    peak = max(rate for _, rate in rates)
    angle, formula = _theory_and_formula(method.theory_angle, config, peak)
    if angle is not None:
      text = rf"$\theta^* = {formula}$" if formula else r"$\theta^*$"
      lines["angle"] = TheoryLine(
          "angle", [step for step, _ in rates],
          [method.theory_angle(config, rate) for _, rate in rates],
          f"{text} = {angle:.3g} rad (logged rate {peak:g})")
  tau, formula = _theory_and_formula(method.theory_time_constant, config)
  if tau is not None:
    text = rf"$\tau = {formula}$" if formula else r"$\tau$"
    lines["time_constant"] = TheoryLine("time_constant", [], [tau],
                                        f"{text} = {tau:.4g} steps")
  return lines


# ----------------------------------------------------------------- plotting

def select_layers(runs: Sequence[Run], layers_regex: Optional[str] = None) -> list[str]:
  """The layer paths of all runs matching ``layers_regex``, in natural order."""
  names = sorted({n for run in runs for n in run.layer_names()}, key=_natural_key)
  if layers_regex is None:
    return names
  try:
    pattern = re.compile(layers_regex)
  except re.error as e:
    raise errors.InputError(f"--layers={layers_regex!r} is not a valid regex: {e}") from None
  selected = [n for n in names if pattern.search(n)]
  if not selected:
    listed = ", ".join(names) if names else "(none: no run has a grouped layer)"
    raise errors.InputError(f"--layers={layers_regex!r} selects no layer; the layers are: {listed}")
  return selected


def _natural_key(name: str) -> list:
  """``convs/2/kernel`` before ``convs/10/kernel``."""
  return [(0, int(part), "") if part.isdigit() else (1, 0, part)
          for part in re.split(r"(\d+)", name)]


def unique_labels(runs: Sequence[Run]) -> list[str]:
  """The runs' labels, with the folder name added where two labels are equal."""
  labels = [run.label for run in runs]
  return [f"{label} ({os.path.basename(os.path.normpath(run.workdir))})"
          if labels.count(label) > 1 else label for run, label in zip(runs, labels)]


def _colors(n: int) -> list:
  cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
  if n <= 20:
    return [cmap(i) for i in range(n)]
  viridis = matplotlib.colormaps["viridis"]
  return [viridis(i / (n - 1)) for i in range(n)]


def _new_figure(panels: int) -> tuple[Figure, list]:
  cols = math.ceil(math.sqrt(panels))
  rows = math.ceil(panels / cols)
  fig = Figure(figsize=(4 * cols, 3 * rows + 0.8), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for ax in axes[panels:]:
    ax.set_visible(False)
  return fig, list(axes[:panels])


def _layer_series(run: Run, names: Sequence[str], key: str, log: bool):
  """Steps and, per step, the median over ``names`` of ``key`` (NaN where absent)."""
  steps, values = [], []
  for record in run.train:
    layers = record.get("layers") or {}
    found = [_finite(layers[n].get(key), log) for n in names if n in layers]
    found = [v for v in found if not math.isnan(v)]
    if any(n in layers for n in names):
      steps.append(record["step"])
      values.append(statistics.median(found) if found else math.nan)
  return steps, values


def _finite(value: Any, log: bool) -> float:
  """``value`` as a float; NaN if missing, non-finite, or not positive on a log axis."""
  if not isinstance(value, (int, float)) or not math.isfinite(value) or (log and value <= 0):
    return math.nan
  return float(value)


def layer_figure(runs: Sequence[Run], layers: Sequence[str], key: str, title: str,
                 log: bool, labels: Sequence[str], colors: Sequence,
                 theories: Optional[Sequence[dict[str, TheoryLine]]] = None) -> Figure:
  """One panel per layer (the last one a median over the rest if there are too many).

  ``theories`` (per run, :func:`theory_lines`): the theory of ``key``
  (``THEORY_OF_KEY``) dashed in each panel, with its formula in the legend. A run's
  entry ``(kind, layer)`` is that layer's own line (``None``: none), drawn in its panel
  instead of the run's.
  """
  panels = [([n], n) for n in layers]
  if len(panels) > MAX_PANELS:
    rest = layers[MAX_PANELS - 1:]
    panels = panels[:MAX_PANELS - 1] + [(rest, f"median of the other {len(rest)} layers")]
  fig, axes = _new_figure(len(panels))
  drawn, theory_drawn = {}, {}
  for ax, (names, name) in zip(axes, panels):
    has_data = False
    for i, run in enumerate(runs):
      steps, values = _layer_series(run, names, key, log)
      if steps:
        drawn[i] = ax.plot(steps, values, color=colors[i], lw=1.2)[0]
        has_data |= not all(map(math.isnan, values))
        lines, kind = (theories[i] if theories else {}), THEORY_OF_KEY.get(key)
        line = lines[(kind, names[0])] if (kind, names[0]) in lines and len(names) == 1 else (
            lines.get(kind))
        if line is not None and line.kind == "angle":
          theory_drawn[i] = (ax.plot(line.steps, line.values, color=colors[i], lw=1.2,
                                     ls="--")[0], line.label)
        elif line is not None:
          theory_drawn[i] = (ax.axvline(line.values[0], color=colors[i], lw=1.2, ls="--"),
                             line.label)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("step")
    if log and has_data:  # a log axis with nothing positive on it only warns
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
  fig.suptitle(title)
  # One legend: the runs, then the theory's dashed lines with their formulas (one a row).
  order, theory_order = sorted(drawn), sorted(theory_drawn)
  fig.legend([drawn[i] for i in order] + [theory_drawn[i][0] for i in theory_order],
             [labels[i] for i in order]
             + [f"theory, {labels[i]}: {theory_drawn[i][1]}" for i in theory_order],
             loc="outside lower center", ncols=1 if theory_order else min(len(order), 3),
             fontsize=9)
  return fig


def curve_figure(runs: Sequence[Run], key: str, title: str, labels: Sequence[str],
                 colors: Sequence) -> Figure:
  """Train (thin) and test (thick, markers) ``key`` against the epoch, one colour per run."""
  fig, (ax,) = _new_figure(1)
  fig.set_size_inches(7, 5)
  for i, run in enumerate(runs):
    ax.plot([r.get("epoch", math.nan) for r in run.train],
            [_finite(r.get(key), False) for r in run.train],
            color=colors[i], lw=0.8, alpha=0.6)
    ax.plot([r.get("epoch", math.nan) for r in run.test],
            [_finite(r.get(key), False) for r in run.test],
            color=colors[i], lw=2, marker="o", ms=4)
  handles = [Line2D([], [], color=colors[i], lw=2) for i in range(len(runs))]
  handles += [Line2D([], [], color="gray", lw=0.8), Line2D([], [], color="gray", lw=2,
                                                           marker="o", ms=4)]
  ax.legend(handles, list(labels) + ["train", "test"], fontsize=9)
  ax.set_xlabel("epoch")
  ax.set_ylabel(title)
  ax.set_title(f"{title}: train (thin) and test (thick)")
  ax.grid(alpha=0.3)
  return fig


def make_figures(runs: Sequence[Run], layers_regex: Optional[str] = None) -> dict[str, Figure]:
  """File name -> Figure, before saving (tests and notebooks can inspect them)."""
  if not runs:
    raise ValueError("no runs to plot")
  layers = select_layers(runs, layers_regex)
  labels, colors = unique_labels(runs), _colors(len(runs))
  figures = {}
  if layers:
    theories = [theory_lines(run) for run in runs]
    for filename, (key, title, log) in LAYER_FIGURES.items():
      figures[filename] = layer_figure(runs, layers, key, title, log, labels, colors,
                                       theories)
  curves = {f"{h}.png": (h, h) for h in dict.fromkeys(headline(run) for run in runs)}
  for filename, (key, title) in {**curves, **CURVE_FIGURES}.items():
    figures[filename] = curve_figure(runs, key, title, labels, colors)
  return figures


def headline(run: Run) -> str:
  """The headline metric of the run's task (``experiments.tasks``; the default task's for
  a run without config.json; the loss for a task not registered in this process)."""
  from experiments import tasks  # pylint: disable=g-import-not-at-top
  try:
    return tasks.of(run.config).headline
  except errors.InputError:
    return "loss"


def plot_runs(runs: Sequence[Run], out_dir: str,
              layers_regex: Optional[str] = None) -> list[str]:
  """Writes the PNGs of ``runs`` into ``out_dir`` (created if missing; a folder or a
  ``gs://`` URL, through ``etils.epath``); returns their paths."""
  figures = make_figures(runs, layers_regex)
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  paths = []
  for filename, fig in figures.items():
    path = os.path.join(out_dir, filename)
    with epath.Path(path).open("wb") as f:
      fig.savefig(f, format="png", dpi=100)
    paths.append(path)
  return paths


# --------------------------------------------------------------- command line

def main(argv: Sequence[str]) -> None:
  with errors.one_line("experiments.plot"):
    workdirs = list(argv[1:])
    if not workdirs:
      raise errors.InputError("give at least one WORKDIR: python -m experiments.plot WORKDIR ...")
    for workdir in workdirs + [_OUT.value or workdirs[0]]:
      workdir_lib.resolve(workdir, "WORKDIR")  # gs:// (through gcsfs) or local; else one line
    label_keys = [k.strip() for k in _LABEL.value.split(",") if k.strip()]
    runs = [read_run(w, label_keys) for w in workdirs]
    check_label_keys(runs, label_keys)
    paths = plot_runs(runs, _OUT.value or workdirs[0], _LAYERS.value)
  for path in paths:
    print(path)


if __name__ == "__main__":
  app.run(main)
