"""Multi-host training for real: two processes of the launcher on localhost, talking over
gloo CPU collectives, against the same run in one process with two devices.

Each process sees one CPU device and the mesh spans both; each feeds its half of every
global batch. The pair is stopped abruptly after step 10 (as if killed) and restarted
with the same command; it must end with the parameters of the uninterrupted one-process
run, to float tolerance, and every file must have been written once (by process 0).
Ports: a free one is picked, a busy one skipped; both processes are ended whatever happens.
"""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import chex
import pytest

from experiments import checkpoint as ckpt_lib
from experiments import data as data_lib
from experiments import trainer
from experiments.config import Config

import runs

CIFAR = os.environ.get("NORMREG_CIFAR10_DIR")
FLAGS = dict(dataset="folder", model="cnn", width=4, batch_size=32, epochs=2, log_every=4,
             train_size=256, test_size=128, lr=0.05, method="l2", lam=1e-3)
TIMEOUT = 240


def _flags(data_dir):
  return [f"--{k}={v}" for k, v in {**FLAGS, "data_dir": data_dir}.items()]


def _port_is_free(port):
  with socket.socket() as s:
    try:
      s.bind(("127.0.0.1", port))
    except OSError:
      return False
  return True


def free_port(skip=()):
  """A port nothing listens on (the kernel's pick), other than ``skip``."""
  while True:
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    if port not in skip and _port_is_free(port):
      return port


@contextlib.contextmanager
def processes(commands, env):
  """Starts every command in its own session; kills what is left on exit."""
  procs = []
  try:
    for cmd in commands:
      procs.append(subprocess.Popen(cmd, cwd=runs.REPO, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True,
                                    start_new_session=True))
    yield procs
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
      p.wait()


def run_pair(data_dir, workdir, extra=(), ports=None, module="experiments.train",
             extra_of=((), ())):
  """Runs the two-process launcher (``extra_of[i]``: flags of process ``i`` alone); returns
  ``(return codes, stderr of each)``. Tries the next port when one is taken (by the time
  the coordinator binds it)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  for port in ports or [free_port()]:
    if not _port_is_free(port):
      continue
    commands = [[sys.executable, "-m", module, f"--workdir={workdir}",
                 "--distributed", f"--coordinator_address=127.0.0.1:{port}",
                 "--num_processes=2", f"--process_id={i}", "--cpu_collectives=gloo",
                 *_flags(data_dir), *extra, *extra_of[i]] for i in range(2)]
    with processes(commands, env) as procs:
      deadline = time.time() + TIMEOUT
      outs = []
      for p in procs:
        try:
          outs.append(p.communicate(timeout=max(1, deadline - time.time()))[1])
        except subprocess.TimeoutExpired:
          pytest.fail(f"the pair did not finish in {TIMEOUT} s")
      codes = [p.returncode for p in procs]
    if any("address already in use" in o.lower() for o in outs):
      continue  # taken between the check and the bind: next port
    return codes, outs
  pytest.fail(f"no free port among {ports}")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  if CIFAR:
    return CIFAR
  return runs.image_folder(tmp_path_factory.mktemp("images"), classes=4, n_train=64,
                           n_test=32, size=32)


def _final_state(workdir, data_dir):
  config = Config(**{**FLAGS, "data_dir": data_dir})
  ds = data_lib.load("folder", data_dir=data_dir, train_size=config.train_size,
                     test_size=config.test_size, seed=config.seed)
  like = trainer.initial_state(config, ds)[3]
  manager = ckpt_lib.Manager(os.path.join(workdir, "checkpoints"))
  try:
    return manager.restore_latest(like), manager.latest_step()
  finally:
    manager.close()


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_two_devices_and_resume(data_dir, tmp_path):
  """Preempted (SIGTERM to one process), then killed, then resumed: the records and
  params of one process with two devices."""
  # The reference: one process, two (forced) CPU devices, the same flags.
  ref = tmp_path / "one_process"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  result = runs.command("experiments.train", f"--workdir={ref}", *_flags(data_dir), env=env,
                        timeout=TIMEOUT)
  assert result.returncode == 0, result.stderr[-3000:]

  pair = tmp_path / "two_processes"
  # A preemption: SIGTERM to process 1 alone after step 3. JAX's preemption service tells
  # process 0, and both save the same step, say so in one line and exit 143.
  codes, outs = run_pair(data_dir, pair, extra_of=((), ("--sigterm_after_step=3",)))
  assert codes == [143, 143], outs[0][-3000:] + outs[1][-3000:]
  saved = {int(re.search(r"stopped by SIGTERM at step (\d+) of 16", out).group(1))
           for out in outs}
  assert len(saved) == 1 and 3 < min(saved) < 14, saved  # the same step on both
  saved = saved.pop()
  assert os.path.isdir(pair / "checkpoints" / str(saved))
  codes, outs = run_pair(data_dir, pair, extra=[f"--exit_after_step={saved + 2}"])  # killed
  assert codes == [17, 17], outs[0][-3000:] + outs[1][-3000:]
  assert f"resumed from step {saved} " in outs[0]
  last = 8 if saved < 8 <= saved + 2 else saved  # epoch 1's checkpoint, or the preemption's
  assert os.path.isdir(pair / "checkpoints" / str(last))
  with socket.socket() as busy:  # the restart finds its first port taken and skips it
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken = busy.getsockname()[1]
    codes, outs = run_pair(data_dir, pair, ports=[taken, free_port(skip=(taken,))])
  assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  assert f"resumed from step {last}" in outs[0]

  (final, step), (expected, ref_step) = _final_state(pair, data_dir), _final_state(ref, data_dir)
  assert step == ref_step == 16
  chex.assert_trees_all_close(final.params, expected.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(final.rest, expected.rest, rtol=1e-5, atol=1e-6)

  # Every file once: process 0 alone writes, and the resumed run dropped the records
  # past its checkpoint (the two steps of the killed launch).
  pair_records = runs.read_metrics(pair)
  ref_records = runs.read_metrics(ref)
  assert [(r["kind"], r["step"]) for r in pair_records] == [
      (r["kind"], r["step"]) for r in ref_records]
  for a, b in zip(pair_records, ref_records):
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
  with open(pair / "config.json") as f:
    assert json.load(f)["data_dir"] == data_dir
  events = [f for f in os.listdir(pair / "tensorboard") if "tfevents" in f]
  # One per launch that logged a record, from process 0 only (the killed launch ran two
  # steps: it logged one if they hold a multiple of --log_every=4).
  logged = [True, any(s % 4 == 0 for s in (saved + 1, saved + 2)), True]
  assert len(events) == sum(logged), (events, saved)
  assert sorted(os.listdir(pair)) == sorted(os.listdir(ref))


def test_distributed_flags_need_distributed(tmp_path):
  result = runs.command("experiments.train", f"--workdir={tmp_path}", "--num_processes=2")
  assert result.returncode == 1
  assert "experiments.train: error: --num_processes needs --distributed." in result.stderr


@pytest.mark.slow
def test_a_two_process_sweep_trains_each_run_once(data_dir, tmp_path):
  # The runs of a grid are independent: process p trains runs p, p+2, ...; each run's
  # folder is written by its process alone and ends as in a one-process sweep.
  grid = ["--lr=0.05,0.1", "--epochs=1", "--strategy=sequential"]
  result = runs.command("experiments.sweep", f"--workdir={tmp_path / 'one'}",
                        *_flags(data_dir), *grid, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                        timeout=TIMEOUT)
  assert result.returncode == 0, result.stderr[-3000:]
  codes, outs = run_pair(data_dir, tmp_path / "two", extra=grid, module="experiments.sweep")
  assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  names = sorted(os.listdir(tmp_path / "one"))
  assert names == sorted(os.listdir(tmp_path / "two")) and len(names) == 2
  for name in names:
    one = runs.read_metrics(tmp_path / "one" / name)
    two = runs.read_metrics(tmp_path / "two" / name)
    assert [(r["kind"], r["step"]) for r in one] == [(r["kind"], r["step"]) for r in two]
    assert one[-1]["accuracy"] == pytest.approx(two[-1]["accuracy"], abs=1e-6)
    assert one[-1]["loss"] == pytest.approx(two[-1]["loss"], rel=1e-4)
