"""Makes ``digits.npz`` from scikit-learn's copy of the UCI handwritten digits.

The shipped data set of the launcher (``--dataset=digits``, see README.md in
this folder): scikit-learn bundles the test set of the UCI "Optical
Recognition of Handwritten Digits" data (``optdigits.tes``, 1,797 8x8 images
of integer pixels 0..16) as ``sklearn/datasets/data/digits.csv.gz``, one image
per line: 64 pixels, row by row, then the label. scikit-learn is not a
dependency: take the file from its wheel, once::

  pip download --no-deps scikit-learn -d /tmp/pk
  unzip -o /tmp/pk/scikit_learn-*.whl sklearn/datasets/data/digits.csv.gz -d /tmp/sk
  python experiments/digits/make_digits.py /tmp/sk/sklearn/datasets/data/digits.csv.gz

It writes ``digits.npz`` beside this script: ``images`` uint8 ``(1797, 8, 8)``
(the pixels as given, 0..16, in the file's order), ``labels`` uint8 ``(1797,)``
and ``test`` bool ``(1797,)``: a fixed split of 30 test images per class (300)
drawn with ``numpy.random.default_rng(0)``, the other 1,497 for training. The
split is stored, not recomputed, so it never depends on numpy's generator.
"""

import hashlib
import os
import sys

import numpy as np

TEST_PER_CLASS = 30
# sha256 of the digits.csv.gz of scikit-learn 1.9.1, the file digits.npz was made from.
SOURCE_SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"


def make(csv_gz: str, out: str) -> None:
  with open(csv_gz, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  if digest != SOURCE_SHA256:
    raise ValueError(f"{csv_gz}: sha256 {digest}, not the {SOURCE_SHA256} of the file "
                     "digits.npz was made from (scikit-learn 1.9.1's).")
  table = np.loadtxt(csv_gz, delimiter=",", dtype=np.int64)
  if table.shape != (1797, 65) or table.min() < 0 or table[:, :64].max() > 16:
    raise ValueError(f"{csv_gz}: expected 1797 rows of 64 pixels in 0..16 and a label, got "
                     f"shape {table.shape}, values {table.min()}..{table.max()}")
  images = table[:, :64].reshape(-1, 8, 8).astype(np.uint8)
  labels = table[:, 64].astype(np.uint8)
  rng = np.random.default_rng(0)
  test = np.zeros(len(labels), bool)
  for k in range(10):
    test[rng.choice(np.flatnonzero(labels == k), TEST_PER_CLASS, replace=False)] = True
  np.savez_compressed(out, images=images, labels=labels, test=test)
  print(f"wrote {out}: {int((~test).sum())} train, {int(test.sum())} test images")


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit(__doc__)
  make(sys.argv[1], os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.npz"))
