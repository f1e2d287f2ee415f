"""The commands as a user runs them: clean failures, a workdir a failed start leaves
usable, TensorBoard files that read back, and the catalog data path with and without
its extra.

Every error a user can cause is one line on stderr, ``experiments.X: error: ...``
naming the flag, with exit status 1 and no traceback.
"""

import dataclasses
import http.server
import json
import os
import re
import socketserver
import subprocess
import sys
import threading
from unittest import mock

import numpy as np
import pytest

from experiments import config as config_lib
from experiments import data as data_lib
from experiments import errors
from experiments import records
from experiments import trainer
from experiments.config import Config

import runs

SMALL = ["--model=cnn", "--width=4", "--epochs=1", "--batch_size=16", "--log_every=2",
         "--lr=0.05"]


def _one_line_error(result, program, *needles):
  return runs.one_line(result, f"{program}: error:", *needles)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return runs.image_folder(tmp_path_factory.mktemp("images"))


@pytest.mark.slow
def test_a_failed_start_leaves_nothing_that_blocks_the_corrected_command(tmp_path, folder):
  workdir = str(tmp_path / "a")
  wrong = runs.command("experiments.train", "--dataset=folder", f"--data_dir={tmp_path}/WRONG",
                       f"--workdir={workdir}", *SMALL)
  _one_line_error(wrong, "experiments.train", "--data_dir", "WRONG")
  assert not os.path.exists(os.path.join(workdir, "config.json"))
  right = runs.command("experiments.train", "--dataset=folder", f"--data_dir={folder}",
                       f"--workdir={workdir}", *SMALL)
  assert right.returncode == 0, right.stderr[-3000:]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["data_dir"] == folder
  test = runs.read_metrics(workdir)[-1]
  assert test["kind"] == "test"
  # Quiet by default: no INFO line (absl's "I1128 ..." format: orbax, the groups, the
  # settings); the evaluation shows its own progress bar ("test").
  assert not re.search(r"^I\d{4} ", right.stderr, re.M), right.stderr[-3000:]
  assert "test: " in right.stderr and "batch" in right.stderr, right.stderr[-3000:]
  # The last line says how the run ended and where its metrics and figures are.
  figures = os.path.join(workdir, "figures")
  assert re.fullmatch(
      rf"test accuracy {test['accuracy']:.4f} after 1 epoch \({test['step']} steps, \d+ s\); "
      rf"metrics: {re.escape(os.path.join(workdir, 'metrics.jsonl'))}; figures: "
      rf"{re.escape(figures + os.sep)}", right.stdout.splitlines()[-1]), right.stdout[-500:]
  assert sorted(os.listdir(figures)) == ["accuracy.png", "angular_update.png",
                                         "effective_lr.png", "loss.png", "weight_norm.png"]


@pytest.mark.slow
@pytest.mark.parametrize("program, args, needles", [
    ("experiments.train", ["--dataset=folder", "--data_dir=MISSING"], ["--data_dir=MISSING"]),
    ("experiments.train", ["--dataset=folder", "--data_dir=FOLDER", "--batch_size=4096"],
     ["--batch_size=4096 is larger than the training set"]),
    ("experiments.train", ["--lr=-1"], ["--lr must be > 0"]),
    ("experiments.train", ["--dataset=imagenet"], ["--dataset='imagenet'"]),
    ("experiments.train", ["--dataset=folder", "--data_dir=FOLDER", "--group_rules=x=unit"],
     ["--group_rules", "match no parameter"]),
    ("experiments.sweep", ["--dataset=folder", "--data_dir=MISSING", "--lr=0.1,0.2"],
     ["--data_dir=MISSING"]),
    ("experiments.sweep", ["--lr=0.1,0.1"], ["--lr lists 0.1 more than once"]),
    ("experiments.sweep", ["--dataset=folder", "--data_dir=FOLDER", "--lr=0.1",
                           "--batch_size=4096"], ["--batch_size=4096 is larger"]),
    ("experiments.reproduce", ["--data_dir=MISSING"], ["--data_dir=MISSING is not a folder"]),
    ("experiments.plot", ["MISSING"], ["MISSING: no such folder"]),
    ("experiments.plot", ["EMPTY"], ["no such file (is", "a training workdir?)"]),
])
def test_user_errors_are_one_line_naming_the_flag(tmp_path, folder, program, args, needles):
  (tmp_path / "empty").mkdir()
  subs = {"MISSING": str(tmp_path / "missing"), "FOLDER": folder,
          "EMPTY": str(tmp_path / "empty")}

  def fill(text):
    for key, value in subs.items():
      text = text.replace(key, value)
    return text

  args = [fill(a) for a in args]
  if program in ("experiments.train", "experiments.sweep"):
    args = [f"--workdir={tmp_path / 'w'}"] + [a for a in SMALL if a.split("=")[0] not in
                                               {b.split("=")[0] for b in args}] + args
  if program == "experiments.reproduce":
    args += [f"--workdir={tmp_path / 'w'}"]
  result = runs.command(program, *args)
  _one_line_error(result, program, *[fill(n) for n in needles])
  if program in ("experiments.train", "experiments.sweep"):
    assert not os.path.exists(tmp_path / "w" / "config.json")


# -------------------------------------------------------------------- TensorBoard


def test_tensorboard_events_mirror_metrics_jsonl(tmp_path):
  config = Config(dataset="cifar10", model="cnn", width=4, epochs=2, batch_size=16,
                  log_every=2, lr=0.05, method="l2", lam=1e-3)
  trainer.train_and_evaluate(config, str(tmp_path), dataset=runs.tiny_dataset(), progress=False)
  events = records.read_events(str(tmp_path / records.TENSORBOARD_DIR))
  metrics = runs.read_metrics(tmp_path)
  train = [r for r in metrics if r["kind"] == "train"]
  test = [r for r in metrics if r["kind"] == "test"]
  assert [s for s, _ in events["train/loss"]] == [r["step"] for r in train]
  np.testing.assert_allclose([v for _, v in events["train/loss"]], [r["loss"] for r in train],
                             rtol=1e-6)
  np.testing.assert_allclose([v for _, v in events["test/accuracy"]],
                             [r["accuracy"] for r in test], rtol=1e-6)
  layer = "convs/0/kernel"
  for key in ("norm", "elr", "angle"):
    np.testing.assert_allclose([v for _, v in events[f"{key}/{layer}"]],
                               [r["layers"][layer][key] for r in train], rtol=1e-6)


def test_tensorboard_can_be_turned_off(tmp_path):
  config = Config(dataset="cifar10", model="cnn", width=4, epochs=1, batch_size=16,
                  log_every=2, lr=0.05)
  trainer.train_and_evaluate(config, str(tmp_path), dataset=runs.tiny_dataset(),
                             progress=False, tensorboard=False)
  assert not os.path.exists(tmp_path / records.TENSORBOARD_DIR)
  assert runs.read_metrics(tmp_path)


# ---------------------------------------------------------- the catalog data path


def _fake_cifar10_download(root, per_file=2):
  """A cifar-10-binary.tar.gz as extracted: 1 label byte + 3072 pixel bytes per record."""
  path = os.path.join(root, "cifar-10-batches-bin")
  os.makedirs(path)
  rng = np.random.default_rng(0)
  files = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
  written = {}
  for name in files:
    labels = rng.integers(0, 10, per_file)
    pixels = rng.integers(0, 256, (per_file, 3072))
    np.concatenate([labels[:, None], pixels], 1).astype(np.uint8).tofile(
        os.path.join(path, name))
    written[name] = (labels, pixels)
  names = "airplane automobile bird cat deer dog frog horse ship truck".split()
  with open(os.path.join(path, "batches.meta.txt"), "w") as f:
    f.write("\n".join(names))
  return written


def _has_tfds_extra():
  try:
    import importlib_resources  # pylint: disable=g-import-not-at-top
    import tensorflow  # pylint: disable=g-import-not-at-top
    del importlib_resources, tensorflow
  except ImportError:
    return False
  return True


@pytest.mark.slow
@pytest.mark.skipif(not _has_tfds_extra(), reason="the tfds extra (pip install -e '.[tfds]') "
                    "is not installed: preparing a catalog data set needs TensorFlow")
def test_catalog_preparation_runs_offline_with_the_extra(tmp_path):
  """The real download-and-prepare path of --dataset=cifar10 (tfds' own builder, array_record
  files, TensorFlow's encoders), with only the download (and its probe) replaced by local
  files."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  written = _fake_cifar10_download(str(tmp_path / "download"))
  with mock.patch.object(tfds.download.DownloadManager, "download_and_extract",
                         lambda self, url: str(tmp_path / "download")), \
       mock.patch.object(data_lib, "probe_download", lambda name, urls: None):
    ds = data_lib.load("cifar10", data_dir=str(tmp_path / "tfds"))
  assert ds.train_images.shape == (10, 32, 32, 3) and ds.test_images.shape == (2, 32, 32, 3)
  labels, pixels = written["test_batch.bin"]
  # CIFAR's binary layout is channel-major: 1024 red, then green, then blue bytes.
  expect = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  np.testing.assert_array_equal(np.sort(ds.test_labels), np.sort(labels))
  for label, image in zip(labels, expect):
    match = [i for i in range(2) if np.array_equal(ds.test_images[i], image)]
    assert match and ds.test_labels[match[0]] == label
  assert ds.class_names[0] == "airplane"


_WITHOUT_TENSORFLOW = """
import sys
from unittest import mock
import tensorflow_datasets as tfds
sys.modules["tensorflow"] = None  # as if the tfds extra were not installed
from experiments import data, errors
data.probe_download = lambda name, urls: None  # the download is local files: no network
with mock.patch.object(tfds.download.DownloadManager, "download_and_extract",
                       lambda self, url: sys.argv[1]):
  try:
    data.load("cifar10", data_dir=sys.argv[2])
  except errors.MissingExtraError as e:
    print("MissingExtraError:", e)
"""


@pytest.mark.slow
def test_catalog_without_the_extra_is_one_line(tmp_path):
  # Without TensorFlow, preparing --dataset=cifar10 (the download done, here
  # by local files) says what to install. A fresh process: no TensorFlow imported before.
  _fake_cifar10_download(str(tmp_path / "download"))
  result = subprocess.run([sys.executable, "-c", _WITHOUT_TENSORFLOW, str(tmp_path / "download"),
                           str(tmp_path / "tfds")], capture_output=True, text=True,
                          timeout=300, cwd=runs.REPO)
  line = [l for l in result.stdout.splitlines() if l.startswith("MissingExtraError:")]
  assert line, result.stderr[-3000:]
  assert "--dataset=cifar10" in line[0] and "pip install -e '.[tfds]'" in line[0]
  assert "--dataset=folder" in line[0]


class _Proxy(http.server.BaseHTTPRequestHandler):
  """A proxy to a network where nothing downloads: every request is recorded; a HEAD gets
  200 (so the probe of a plain-http URL passes), a GET 404, an https tunnel 403."""

  def log_message(self, *args):
    del args

  def _answer(self, status):
    self.server.seen.append(f"{self.command} {self.path}")
    self.send_response(status)
    self.send_header("Content-Length", "0")
    self.end_headers()

  def do_HEAD(self):  # pylint: disable=invalid-name
    self._answer(200)

  def do_GET(self):  # pylint: disable=invalid-name
    self._answer(404)

  def do_CONNECT(self):  # pylint: disable=invalid-name
    self._answer(403)


@pytest.fixture
def proxy(monkeypatch):
  """Points HTTP(S)_PROXY (for this process and the commands it starts) at :class:`_Proxy`;
  yields the list of requests it saw.

  The proxy is not shut down after the test: it serves (on daemon threads) until the
  process ends. tfds' download threads outlive a failed preparation (the first
  failure is raised while the other files' requests go on); shut down, the proxy
  turned their late requests into refused connections, which urllib3 retries 10 times
  with backoff, and the process waited minutes at exit for them (seen in CI, and 3
  times in 5 here with two CPU-bound processes beside it).
  """
  server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Proxy)
  server.daemon_threads, server.seen = True, []
  threading.Thread(target=server.serve_forever, daemon=True).start()
  url = f"http://127.0.0.1:{server.server_address[1]}"
  for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
    monkeypatch.setenv(name, url)
  for name in ("NO_PROXY", "no_proxy"):
    monkeypatch.setenv(name, "")
  yield server.seen


@pytest.mark.slow
def test_catalog_offline_is_one_line_after_one_probe_and_leaves_nothing(tmp_path, proxy):
  # Offline (the proxy refuses the tunnel): one request, then one line naming the way out;
  # tfds' own download, 10 retries with backoff (3.5 minutes), is never started.
  data_dir = tmp_path / "tfds"
  result = runs.command("experiments.train", f"--workdir={tmp_path / 'w'}", "--dataset=cifar10",
                        f"--data_dir={data_dir}", *SMALL, timeout=120)
  _one_line_error(result, "experiments.train", "--dataset=cifar10: cannot reach "
                  "https://www.cs.toronto.edu/", "--dataset=digits", "--dataset=folder")
  assert proxy == ["CONNECT www.cs.toronto.edu:443"]
  assert not os.path.exists(data_dir) and not os.path.exists(tmp_path / "w")


@pytest.mark.skipif(not _has_tfds_extra(), reason="the tfds extra (pip install -e '.[tfds]') "
                    "is not installed: tfds' download manager needs TensorFlow")
def test_a_catalog_download_failing_midway_leaves_no_folders(tmp_path, proxy):
  # fashion_mnist downloads over plain http: the probe (HEAD) passes, the downloads (GET)
  # fail in tfds, which leaves its temporary folders behind; they are removed.
  data_dir = tmp_path / "tfds"
  with pytest.raises(errors.MissingInputError, match="--dataset=fashion_mnist: could not "
                     "download or read it .*HTTP code: 404"):
    data_lib.load("fashion_mnist", data_dir=str(data_dir))
  assert proxy[0].startswith("HEAD http://fashion-mnist") and len(proxy) > 1
  assert all(p.startswith("GET http://fashion-mnist") for p in proxy[1:])
  assert not os.path.exists(data_dir)


def test_every_command_imports_beside_the_others():
  """The commands share flag names (--size, --workdir, --model): each defines its
  flags when it runs, so that a test worker (or a notebook) may import all of them."""
  modules = ["experiments.train", "experiments.sweep", "experiments.distributed",
             "experiments.plot", "experiments.reproduce", "experiments.compare",
             "benchmarks.step_overhead", "benchmarks.detection", "benchmarks.mutation"]
  code = "import importlib\nfor m in %r:\n  importlib.import_module(m)\n" % modules
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=runs.REPO, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]


def test_help_lists_the_launchers_flags_with_their_help_text():
  result = runs.command("experiments.train", "--help")  # absl's --help exits with status 1
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  text = " ".join(result.stdout.split())  # absl wraps the help texts at 80 columns
  helps = {f.name: config_lib._HELP[f.name] for f in dataclasses.fields(Config)}  # pylint: disable=protected-access
  # The launcher's own flags' help, read in a fresh process: importing experiments.train
  # here would make --workdir required in this process's flags (test_plot parses them).
  names = ["workdir", "figures", "distributed", "coordinator_address"]
  read = subprocess.run([sys.executable, "-c", "import json, sys\nfrom absl import flags\n"
                         "from experiments import train\n"
                         "print(json.dumps({n: flags.FLAGS[n].help for n in sys.argv[1:]}))",
                         *names], capture_output=True, text=True, check=True, cwd=runs.REPO)
  helps.update(json.loads(read.stdout))
  for name, help_text in helps.items():
    assert re.search(rf"--(\[no\])?{name}:", text), f"--{name} is missing from --help"
    assert " ".join(help_text.split()) in text, f"--{name}'s help text is missing"
  assert "--xla_" not in text and "--helpfull" in text  # other libraries' flags: --helpfull
