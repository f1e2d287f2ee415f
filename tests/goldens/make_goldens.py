"""Golden trajectories of the angular-update optimizers, made by their official code.

Run once, with torch (CPU) and the official implementations at hand; the tests
(``tests/test_goldens.py``) then compare normreg with the saved trajectories and
need no torch::

    python -m venv /tmp/gold && /tmp/gold/bin/pip install torch numpy adamp==0.3.0
    /tmp/gold/bin/python tests/goldens/make_goldens.py --official_dir=/tmp/official

The official code:

- AdamP and SGDP: clovaai's ``adamp`` package, version 0.3.0 from PyPI (MIT).
- Nero: ``nero.py`` of github.com/jxbz/nero at commit ``NERO_COMMIT`` (CC BY-NC-SA 4.0:
  it is fetched here at generation time and never copied into this repository).
- The rotational wrapper: ``shared/optimizers/{rotational_wrapper,common}.py`` of
  github.com/epfml/REQ at commit ``REQ_COMMIT`` (Apache-2.0), fetched likewise.

``--official_dir`` is where those files are looked for (``nero.py`` and
``shared/optimizers/...`` under it); missing ones are downloaded from the pinned
commits (``raw.githubusercontent.com``).

The problem, the same for every optimizer: four leaves in Flax layout (the output
unit LAST; the official code gets them transposed, unit first, so both sides
reduce over the same elements) and ``STEPS`` gradients computed from the official
trajectory itself, designed so that AdamP's cosine test takes each of its branches
on a known leaf at every step (checked here, in numpy, before anything is saved):

- ``conv`` (3, 3, 2, 4): the gradient is orthogonal to ``w`` per output unit: the
  per-unit branch. Its last unit is nearly dead: a random gradient of size 1e-10,
  below the cosine test's ``eps`` (1e-8), where the ``eps`` convention matters.
- ``dense`` (8, 6): orthogonal to ``w`` as a whole, not per unit: the per-tensor branch.
- ``other`` (4, 3): with a strong radial part: not invariant, neither branch.
- ``bias`` (6,): 1-D, never tested, fully decayed by AdamP/SGDP.

The parameters start off-centre and at uneven norms, so that Nero's and REQ's
balancing at construction changes them.

Each configuration is run twice, in float64 and in float32 (the same gradients,
cast; torch's default dtype set to match, since REQ keeps its step count in a tensor
of the default dtype), and saved as ``NAME.npz`` with ``grads/<leaf>`` (steps, ...) in float64,
``params64/<leaf>`` and ``params32/<leaf>`` (steps + 1, ...: the start, then after
each step) and ``meta``, a JSON string with the hyperparameters and versions.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import urllib.request

import numpy as np

STEPS = 24
SHAPES = {"conv": (3, 3, 2, 4), "dense": (8, 6), "other": (4, 3), "bias": (6,)}
NERO_COMMIT = "32436c0305e1428611497f6dcefd45809e5b08d2"
REQ_COMMIT = "bab824d4ae0ab01f04751e188cf3b521296588f9"
NERO_URL = "https://raw.githubusercontent.com/jxbz/nero/{commit}/nero.py"
REQ_URL = "https://raw.githubusercontent.com/epfml/REQ/{commit}/shared/optimizers/{name}"
DELTA = 0.1  # AdamP's cosine threshold (its default)
COS_EPS = 1e-8  # AdamP's eps (its default)


# ----------------------------------------------------------------------- problem


def initial_params() -> dict[str, np.ndarray]:
  """Off-centre (mean 0.3) and uneven per-unit norms (x0.5 .. x2)."""
  rng = np.random.default_rng(0)
  out = {}
  for name, shape in SHAPES.items():
    w = rng.standard_normal(shape) + 0.3
    if len(shape) > 1:
      w = w * np.linspace(0.5, 2.0, shape[-1])
    out[name] = w
  return out


def _unit_axes(w: np.ndarray) -> tuple[int, ...]:
  return tuple(range(w.ndim - 1))


def gradient(params: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
  """The designed gradient at ``params`` (Flax layout, float64)."""
  out = {}
  for name, w in params.items():
    n = rng.standard_normal(w.shape)
    if name == "conv":
      ax = _unit_axes(w)
      g = n - np.sum(n * w, ax, keepdims=True) / np.sum(w * w, ax, keepdims=True) * w
      g[..., -1] = 1e-10 * n[..., -1]  # nearly dead unit, random direction
    elif name == "dense":
      g = n - np.sum(n * w) / np.sum(w * w) * w
    elif name == "other":
      g = n + 3.0 * w * np.linalg.norm(n) / np.linalg.norm(w)
    else:
      g = n
    out[name] = 0.1 * g
  return out


def cosine_branch(g: np.ndarray, w: np.ndarray) -> str:
  """AdamP's decision for one leaf, in torch's convention (Flax layout)."""
  if w.ndim <= 1:
    return "none"
  ax = _unit_axes(w)

  def cos(axes):
    gn = np.maximum(np.sqrt(np.sum(g * g, axes)), COS_EPS)
    wn = np.maximum(np.sqrt(np.sum(w * w, axes)), COS_EPS)
    return np.abs(np.sum(g * w, axes)) / (gn * wn)

  if np.max(cos(ax)) < DELTA / np.sqrt(w.size // w.shape[-1]):
    return "unit"
  if cos(None) < DELTA / np.sqrt(w.size):
    return "tensor"
  return "none"


EXPECTED_BRANCH = {"conv": "unit", "dense": "tensor", "other": "none", "bias": "none"}


# ------------------------------------------------------------- torch <-> flax


def to_torch_layout(w: np.ndarray) -> np.ndarray:
  """Flax ``(kh, kw, in, out)`` / ``(in, out)`` -> PyTorch ``(out, in, kh, kw)`` / ``(out, in)``."""
  if w.ndim == 4:
    return np.ascontiguousarray(np.transpose(w, (3, 2, 0, 1)))
  if w.ndim == 2:
    return np.ascontiguousarray(w.T)
  return w


def to_flax_layout(w: np.ndarray) -> np.ndarray:
  if w.ndim == 4:
    return np.transpose(w, (2, 3, 1, 0))
  if w.ndim == 2:
    return w.T
  return w


# --------------------------------------------------------------- configurations


def configurations() -> dict[str, dict]:
  """``{name: meta}``: every official run. ``groups`` says what each leaf is for the
  official code's per-group settings (``decay``: gets weight decay; ``rotational``,
  ``per_neuron``: REQ's)."""
  out = {}
  for nesterov in (False, True):
    n = "nesterov" if nesterov else "plain"
    for wd, decay_on in ((0.0, "none"), (0.1, "all"), (0.1, "grouped")):
      tag = "wd0" if wd == 0 else f"wd-{decay_on}"
      out[f"adamp_{n}_{tag}"] = dict(
          optimizer="adamp", lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd,
          decay_on=decay_on, delta=DELTA, wd_ratio=0.1, nesterov=nesterov)
      out[f"sgdp_{n}_{tag}"] = dict(
          optimizer="sgdp", lr=0.05, momentum=0.9, dampening=0.0, weight_decay=wd,
          decay_on=decay_on, delta=DELTA, wd_ratio=0.1, nesterov=nesterov, eps=1e-8)
  out["nero"] = dict(optimizer="nero", lr=0.01, beta=0.999)
  for inner in ("sgdm", "adamw"):
    for zero_mean in (False, True):
      hyper = (dict(lr=0.05, momentum=0.9, weight_decay=5e-4) if inner == "sgdm" else
               dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1))
      out[f"rotational_{inner}_{'centred' if zero_mean else 'plain'}"] = dict(
          optimizer="rotational", inner=inner, zero_mean=zero_mean,
          update_norm_decay_factor=0.9, rotational_eps=1e-8, **hyper)
  return out


# ----------------------------------------------------------------- the official code


def fetch_official(official_dir: str) -> None:
  """Puts ``nero.py`` and REQ's two files under ``official_dir`` (downloads the missing)."""
  wanted = {os.path.join(official_dir, "nero.py"): NERO_URL.format(commit=NERO_COMMIT)}
  for name in ("rotational_wrapper.py", "common.py"):
    wanted[os.path.join(official_dir, "shared", "optimizers", name)] = REQ_URL.format(
        commit=REQ_COMMIT, name=name)
  for path, url in wanted.items():
    if not os.path.exists(path):
      os.makedirs(os.path.dirname(path), exist_ok=True)
      print(f"downloading {url}")
      with urllib.request.urlopen(url, timeout=30) as r, open(path, "wb") as f:
        f.write(r.read())
  # Empty package files: REQ's own shared/optimizers/__init__.py imports its other optimizers.
  for package in ("shared", os.path.join("shared", "optimizers")):
    open(os.path.join(official_dir, package, "__init__.py"), "w").close()


def make_optimizer(meta: dict, tensors: dict, torch):
  """The official optimizer over ``tensors`` (torch layout), with per-leaf groups."""
  opt = meta["optimizer"]
  if opt in ("adamp", "sgdp"):
    import adamp  # clovaai's package  # pylint: disable=g-import-not-at-top
    decayed = {"none": (), "all": tuple(tensors), "grouped": ("conv", "dense")}[meta["decay_on"]]
    groups = [{"params": [tensors[k]], "weight_decay": meta["weight_decay"] if k in decayed
               else 0.0} for k in tensors]
    if opt == "adamp":
      return adamp.AdamP(groups, lr=meta["lr"], betas=meta["betas"], eps=meta["eps"],
                         delta=meta["delta"], wd_ratio=meta["wd_ratio"],
                         nesterov=meta["nesterov"])
    return adamp.SGDP(groups, lr=meta["lr"], momentum=meta["momentum"],
                      dampening=meta["dampening"], nesterov=meta["nesterov"], eps=meta["eps"],
                      delta=meta["delta"], wd_ratio=meta["wd_ratio"])
  if opt == "nero":
    nero = importlib.import_module("nero")
    return nero.Nero(list(tensors.values()), lr=meta["lr"], beta=meta["beta"])
  wrapper = importlib.import_module("shared.optimizers.rotational_wrapper")
  hyper = {k: meta[k] for k in ("lr", "momentum", "betas", "eps", "weight_decay") if k in meta}
  groups = [
      {"params": [tensors["conv"]], "rotational": True, "per_neuron": True},
      {"params": [tensors["dense"]], "rotational": True, "per_neuron": False},
      {"params": [tensors["other"], tensors["bias"]], "rotational": False},
  ]
  return wrapper.RotationalWrapper(
      groups, inner_type=meta["inner"], update_norm_decay_factor=meta["update_norm_decay_factor"],
      zero_mean=meta["zero_mean"], rotational_eps=meta["rotational_eps"], **hyper)


def run_official(meta: dict, dtype: str, grads: list | None, torch):
  """Runs the official optimizer; with ``grads=None`` it designs them along its own
  trajectory (float64 only). Returns ``(params per step, grads)`` in Flax layout."""
  tdtype = {"float64": torch.float64, "float32": torch.float32}[dtype]
  # REQ keeps its step count in a torch.tensor(0.0) of the default dtype, and takes its
  # bias correction from it: a float64 run needs float64 as the default too.
  torch.set_default_dtype(tdtype)
  start = initial_params()
  tensors = {k: torch.nn.Parameter(torch.tensor(to_torch_layout(v), dtype=tdtype))
             for k, v in start.items()}
  opt = make_optimizer(meta, tensors, torch)

  def snapshot():
    return {k: to_flax_layout(t.detach().numpy().astype(np.float64)) for k, t in tensors.items()}

  if meta["optimizer"] == "rotational":  # the official target angle, for normreg.theory
    meta["etar"] = float(opt.etar_func(opt.param_groups[0]))
  rng = np.random.default_rng(1)
  trajectory, made = [snapshot()], []
  for step in range(STEPS):
    if grads is None:
      g = gradient(trajectory[-1], rng)
      for k, v in g.items():
        branch = cosine_branch(v, trajectory[-1][k])
        if branch != EXPECTED_BRANCH[k]:
          raise AssertionError(f"{meta['optimizer']} step {step}: the cosine test takes "
                               f"{branch!r} on {k!r}, designed {EXPECTED_BRANCH[k]!r}")
    else:
      g = grads[step]
    made.append(g)
    for k, t in tensors.items():
      t.grad = torch.tensor(to_torch_layout(g[k]), dtype=tdtype)
    opt.step()
    trajectory.append(snapshot())
  return trajectory, made


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--official_dir", required=True,
                      help="folder with (or for) nero.py and REQ's shared/optimizers/")
  parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
  parser.add_argument("--only", default="", help="comma-separated configuration names")
  args = parser.parse_args(argv)
  import torch  # pylint: disable=g-import-not-at-top
  import adamp  # pylint: disable=g-import-not-at-top
  fetch_official(args.official_dir)
  sys.path.insert(0, os.path.abspath(args.official_dir))
  versions = {"torch": torch.__version__, "adamp": getattr(adamp, "__version__", "0.3.0"),
              "nero": f"jxbz/nero@{NERO_COMMIT}", "req": f"epfml/REQ@{REQ_COMMIT}",
              "numpy": np.__version__}
  only = set(filter(None, args.only.split(",")))
  for name, meta in configurations().items():
    if only and name not in only:
      continue
    traj64, grads = run_official(meta, "float64", None, torch)
    traj32, _ = run_official(meta, "float32", grads, torch)
    arrays = {}
    for k in SHAPES:
      arrays[f"grads/{k}"] = np.stack([g[k] for g in grads])
      arrays[f"params64/{k}"] = np.stack([p[k] for p in traj64])
      arrays[f"params32/{k}"] = np.stack([p[k] for p in traj32]).astype(np.float32)
    arrays["meta"] = np.array(json.dumps({**meta, "steps": STEPS, "versions": versions}))
    path = os.path.join(args.out, f"{name}.npz")
    np.savez_compressed(path, **arrays)
    print(f"{path}: {os.path.getsize(path) / 1024:.0f} KiB")


if __name__ == "__main__":
  main()
