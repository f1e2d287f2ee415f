"""How normreg's cost grows with the model: ``python -m benchmarks.scaling --out=DIR``.

On unscanned transformers (``benchmarks.transformer``: four grouped leaves per
block, found by ``normreg.find_scale_invariant``) from 12 to 1,000 grouped
leaves and from about 1M to 100M parameters, measures for each optimizer step
(the next-token loss's forward-backward pass, the update, ``optax.apply_updates``,
jitted):

- *compile time*: tracing and lowering (``jax.jit(step).lower``: Python, where
  per-leaf work in the transforms shows) and XLA's compilation, timed apart;
- *step time*: median (and IQR) of interleaved steps, each variant against its
  base in its own rounds (``benchmarks.timing``);

for ``spherical_sgd``, ``add_l2_penalty`` + ``optax.sgd`` and the metrics
(``normreg.unit_norms``, ``effective_learning_rate`` and ``angular_update`` of
the step, returned by it) against ``optax.sgd`` (momentum 0.9), and ``adamp``
against ``optax.adamw``. Per model also: ``find_scale_invariant``'s first call
(trace, compile and run its vmapped VJP, the numpy tests) against the first call
(compile and run) of one jitted forward-backward pass of the same model and
batch. Targets (issue 22): step-time ratio <= 1.05 and compile-time ratio <= 1.5
at 1,000 grouped leaves; detection within 3x of the forward-backward pass.

Writes ``DIR/scaling.json``, ``DIR/scaling.md`` (the table) and
``DIR/scaling.png`` (log-log: compile time against grouped leaves, step time
against parameters, detection against the forward-backward pass). Each model
runs in a fresh process (nothing cached between models), one after another.
``--size=small`` is a check of the script (one tiny model).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from typing import Any, Sequence

from absl import app
from absl import flags

# (layers, width) of each model; heads 4, MLP 4x, byte vocabulary.
SIZES = {
    "full": dict(models=[(250, 32), (25, 576), (25, 64), (3, 192), (3, 1536)], batch=4,
                 seq_len=32, rounds=5),
    "small": dict(models=[(2, 16)], batch=2, seq_len=8, rounds=2),
}
# (variant, its base): each variant is timed against its base.
PAIRS = (("spherical_sgd", "sgd"), ("l2_sgd", "sgd"), ("metrics_sgd", "sgd"),
         ("adamp", "adamw"))
LR, LAM = 1e-2, 1e-4
TARGETS = {"step_ratio": 1.05, "compile_ratio": 1.5, "detection_ratio": 3.0}


def optimizer(name: str, groups: Any):
  """``(tx, extra)`` of a variant: its optax transformation, and the metrics its step
  returns (``None``: the loss only)."""
  import optax  # pylint: disable=g-import-not-at-top
  import normreg  # pylint: disable=g-import-not-at-top
  sgd = lambda: optax.sgd(LR, momentum=0.9)
  if name == "metrics_sgd":
    extra = lambda before, after: (normreg.unit_norms(after, groups),
                                   normreg.effective_learning_rate(LR, after, groups),
                                   normreg.angular_update(before, after, groups))
    return sgd(), extra
  return {"sgd": sgd,
          "spherical_sgd": lambda: normreg.spherical_sgd(LR, groups, momentum=0.9),
          "l2_sgd": lambda: optax.chain(normreg.add_l2_penalty(LAM, groups), sgd()),
          "adamw": lambda: optax.adamw(1e-3),
          "adamp": lambda: normreg.adamp(1e-3, groups)}[name](), None


def measure(layers: int, width: int, batch: int, seq_len: int, rounds: int) -> dict:
  """Every figure of one model, in this process (see the module docstring)."""
  from benchmarks import timing  # pylint: disable=g-import-not-at-top
  from benchmarks import transformer as tf_lib  # pylint: disable=g-import-not-at-top

  load = os.getloadavg()
  built = tf_lib.detected(batch, seq_len=seq_len, layers=layers, width=width, heads=4)
  graphdef, params, tokens, groups = (built[k] for k in ("graphdef", "params", "tokens",
                                                         "groups"))
  out = {**_detection_fields(layers, width, built), "load_average_at_start": load,
         "leaves": built["leaves"], "tokens_per_step": batch * seq_len, "variants": {}}

  def build(name):
    tx, extra = optimizer(name, groups)
    state = (params, tx.init(params))
    step, trace_s, compile_s = timing.compile_seconds(
        tf_lib.make_lm_step(graphdef, tx, extra), state, tokens)
    out["variants"][name] = {"trace_s": trace_s, "compile_s": compile_s}
    return timing.Timed(name, step, state, (tokens,))

  bases = {}
  for name, base in PAIRS:
    if base not in bases:
      bases[base] = build(base)
      timing.warm_up([bases[base]], 1)
    variant = build(name)
    timing.warm_up([variant], 1)
    pair = [bases[base], variant]
    for t in pair:
      t.times.clear()
    timing.interleave(pair, rounds)
    v, b = out["variants"][name], out["variants"][base]
    v.update(base=base, step_ms=1e3 * variant.median, step_iqr_ms=1e3 * variant.iqr,
             base_step_ms=1e3 * pair[0].median, base_step_iqr_ms=1e3 * pair[0].iqr,
             step_ratio=variant.median / pair[0].median,
             compile_ratio=(v["trace_s"] + v["compile_s"]) / (b["trace_s"] + b["compile_s"]),
             trace_ratio=v["trace_s"] / b["trace_s"])
    del variant, pair
  return out


def measure_update(layers: int, width: int, rounds: int) -> dict:
  """The optimizer alone on one model's params: ``jax.jit`` of ``tx.update`` and
  ``optax.apply_updates`` (and the metrics) of each variant, compile and step time, each
  variant interleaved with its base. Groups from ``benchmarks.transformer.rules`` (what
  detection finds). What normreg adds to a train step's compile and step time is this
  program's difference from its base's, at a fraction of the cost of compiling the model."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import normreg  # pylint: disable=g-import-not-at-top
  from benchmarks import timing  # pylint: disable=g-import-not-at-top
  from benchmarks import transformer as tf_lib  # pylint: disable=g-import-not-at-top

  model = tf_lib.Transformer(layers=layers, width=width, heads=4, rngs=nnx.Rngs(0))
  params = nnx.split(model, nnx.Param)[1]
  groups = normreg.groups_from_rules(params, tf_lib.rules(), log=False)
  grads = jax.tree.map(lambda p: 1e-3 * p + 1e-4, params)
  out = {"layers": layers, "width": width, "params": tf_lib.count_params(params),
         "load_average_at_start": os.getloadavg(), "variants": {}}

  def build(name):
    tx, extra = optimizer(name, groups)

    def step(state, grads):
      p, opt_state = state
      updates, opt_state = tx.update(grads, opt_state, p)
      new = optax.apply_updates(p, updates)
      return (new, opt_state), (None if extra is None else extra(p, new))

    state = (params, tx.init(params))
    compiled, trace_s, compile_s = timing.compile_seconds(step, state, grads)
    out["variants"][name] = {"trace_s": trace_s, "compile_s": compile_s}
    return timing.Timed(name, compiled, state, (grads,))

  bases = {}
  for name, base in PAIRS:
    if base not in bases:
      bases[base] = build(base)
    pair = [bases[base], build(name)]
    timing.warm_up(pair, 1)
    for t in pair:
      t.times.clear()
    timing.interleave(pair, rounds)
    out["variants"][name].update(base=base, step_ms=1e3 * pair[1].median,
                                 base_step_ms=1e3 * pair[0].median)
  return out


def _g(x: float) -> str:
  return f"{x:.3g}"


def table(models: Sequence[dict]) -> str:
  """The markdown table: one row per model and variant."""
  from benchmarks import timing  # pylint: disable=g-import-not-at-top
  rows = []
  for m in models:
    for name, _ in PAIRS:
      v = m["variants"][name]
      b = m["variants"][v["base"]]
      rows.append([m["grouped"], f"{m['params'] / 1e6:.2g}M", f"{name} / {v['base']}",
                   f"{_g(v['trace_s'])} / {_g(b['trace_s'])}",
                   f"{_g(v['compile_s'])} / {_g(b['compile_s'])}", f"{v['compile_ratio']:.2f}",
                   f"{_g(v['step_ms'])} / {_g(v['base_step_ms'])}", f"{v['step_ratio']:.3f}",
                   f"{_g(m['detection_s'])} / {_g(m['fwd_bwd_first_s'])} = "
                   f"{m['detection_ratio']:.2f}"])
  return timing.markdown_table(
      ["grouped leaves", "params", "variant / base", "trace s", "XLA compile s",
       "compile ratio", "step ms", "step ratio", "detection / fwd-bwd s"], rows)


def figure(models: Sequence[dict], path: str) -> None:
  """Three log-log panels: compile time vs grouped leaves, step time vs parameters,
  detection and forward-backward time vs parameters."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(12, 3.6), dpi=80)
  FigureCanvasAgg(fig)
  ax = fig.subplots(1, 3)
  for name in ["sgd", "adamw"] + [name for name, _ in PAIRS]:
    base = name in ("sgd", "adamw")
    compile_pts, step_pts = [], []
    for m in models:
      v = m["variants"][name]
      compile_pts.append((m["grouped"], v["trace_s"] + v["compile_s"]))
      # A base's step time: from the first pair it was timed in.
      step_ms = (next(p["base_step_ms"] for p in m["variants"].values()
                      if p.get("base") == name) if base else v["step_ms"])
      step_pts.append((m["params"], step_ms))
    for a, pts in ((ax[0], compile_pts), (ax[1], step_pts)):
      a.plot([p[0] for p in pts], [p[1] for p in pts], linestyle="none",
             marker="s" if base else "o", fillstyle="none" if base else "full", label=name)
  for key, label, marker in (("detection_s", "find_scale_invariant", "o"),
                             ("fwd_bwd_first_s", "forward-backward (compile + run)", "s")):
    ax[2].plot([m["params"] for m in models], [m[key] for m in models], linestyle="none",
               marker=marker, label=label)
  titles = ("compile (trace + XLA) s vs grouped leaves", "step ms vs parameters",
            "first call s vs parameters")
  for a, title in zip(ax, titles):
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_title(title, fontsize=9)
    a.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path)


def define_flags() -> None:
  flags.DEFINE_string("out", None, "Folder for scaling.json, scaling.md and scaling.png.")
  flags.DEFINE_enum("size", "full", list(SIZES), "full: the README's figures (about an hour "
                    "on a 2-core CPU); small: a check of the script.")
  flags.DEFINE_list("models", [], "LAYERSxWIDTH of the models to measure (default: the "
                    "size's), e.g. 25x64,3x192; the batch and rounds are the size's.")
  flags.DEFINE_bool("detection_only", False, "Time only find_scale_invariant against the "
                    "first forward-backward call, one line per model (writes nothing).")


FLAGS = flags.FLAGS


def run(size: str, out: str, only: Sequence[tuple[int, int]] = ()) -> dict:
  """Measures every model of ``size`` (or ``only`` those), each in a fresh process; writes
  the report."""
  spec = SIZES[size]
  os.makedirs(out, exist_ok=True)
  models = []
  for layers, width in only or spec["models"]:
    args = json.dumps([layers, width, spec["batch"], spec["seq_len"], spec["rounds"]])
    # small: a check of the script; XLA's optimizations mostly off, to compile faster.
    env = dict(os.environ, **({"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"} if size == "small" else {}))
    result = subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--", "--one", args],
                            capture_output=True, text=True, check=False, env=env)
    if result.returncode:
      raise RuntimeError(f"model {layers} x {width} failed:\n{result.stderr[-3000:]}")
    models.append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(f"{layers} x {width}: {models[-1]['grouped']} grouped leaves, "
          f"{models[-1]['params'] / 1e6:.2f}M params", flush=True)
    results = write(size, out, models)  # after every model: a long run keeps what it has
  return results


def detection(size: str, only: Sequence[tuple[int, int]] = ()) -> list[dict]:
  """Detection seconds over the first forward-backward call's, each model in a fresh
  process (nothing cached): the last column of the table, alone."""
  spec = SIZES[size]
  rows = []
  for layers, width in only or spec["models"]:
    args = json.dumps([layers, width, spec["batch"], spec["seq_len"]])
    result = subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--", "--one_detection",
                             args], capture_output=True, text=True, check=False)
    if result.returncode:
      raise RuntimeError(f"model {layers} x {width} failed:\n{result.stderr[-3000:]}")
    rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    r = rows[-1]
    print(f"{layers} x {width}: {r['params'] / 1e6:.3g}M params, {r['grouped']} grouped leaves: "
          f"detection {r['detection_s']:.3g} s / first forward-backward "
          f"{r['fwd_bwd_first_s']:.3g} s = {r['detection_ratio']:.2f} "
          f"(load {os.getloadavg()[0]:.1f})", flush=True)
  return rows


def _one_detection(layers: int, width: int, batch: int, seq_len: int) -> dict:
  from benchmarks import transformer as tf_lib  # pylint: disable=g-import-not-at-top
  return _detection_fields(layers, width, tf_lib.detected(batch, seq_len=seq_len, layers=layers,
                                                          width=width, heads=4))


def _detection_fields(layers: int, width: int, built: dict) -> dict:
  """The model's size and its detection time against the first forward-backward call."""
  return {"layers": layers, "width": width, "params": built["params_count"],
          "grouped": built["grouped"], "detection_s": built["detection_s"],
          "fwd_bwd_first_s": built["fwd_bwd_first_s"],
          "detection_ratio": built["detection_s"] / built["fwd_bwd_first_s"]}


def write(size: str, out: str, models: Sequence[dict]) -> dict:
  """``scaling.json``, ``scaling.md`` and ``scaling.png`` of the models measured so far."""
  import jax  # pylint: disable=g-import-not-at-top
  results = {"size": size, "jax": jax.__version__, "backend": jax.default_backend(),
             "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
             "load_average": os.getloadavg(), "targets": TARGETS, "models": list(models)}
  with open(os.path.join(out, "scaling.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(out, "scaling.md"), "w") as f:
    f.write(table(models) + "\n")
  figure(models, os.path.join(out, "scaling.png"))
  return results


def main(argv):
  if len(argv) > 2 and argv[1] == "--one":
    print(json.dumps(measure(*json.loads(argv[2]))))
    return
  if len(argv) > 2 and argv[1] == "--one_update":
    print(json.dumps(measure_update(*json.loads(argv[2]))))
    return
  if len(argv) > 2 and argv[1] == "--one_detection":
    print(json.dumps(_one_detection(*json.loads(argv[2]))))
    return
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.out and not FLAGS.detection_only:
    raise app.UsageError("--out=DIR is required")
  try:
    only = [tuple(int(n) for n in m.split("x")) for m in FLAGS.models]
  except ValueError:
    raise app.UsageError(f"--models: {FLAGS.models} are not LAYERSxWIDTH") from None
  if FLAGS.detection_only:
    detection(FLAGS.size, only)
    return
  results = run(FLAGS.size, FLAGS.out, only)
  print(table(results["models"]))


if __name__ == "__main__":
  define_flags()
  app.run(main)
