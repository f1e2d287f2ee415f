"""A byte-level language model: ``--task=lm``.

The data are bytes of text (``experiments.text``: by default the running Python's
standard library sources, offline), cut into sequences of ``--seq_len + 1`` bytes.
The model is ``normreg.models.Transformer`` with a byte vocabulary (256), QK-norm
per head and the post-norms of Gemma 2 and 3 (the "sandwich"), so that q and k
(per head), v, o, the MLP's up and down projections are scale-invariant by design
(docs/transformers.md); the gate, the embeddings, the head and the norms' scales
are not. It has no positional encoding: the causal mask gives the order (a NoPE
transformer).

The loss is the next-token cross-entropy in nats; validation reports it, and bits
per byte, ``loss / ln 2`` (a byte is a token), the headline. A model that learned
nothing predicts the uniform distribution: 8 bits per byte. The throughput counts
tokens (``tokens_per_sec``): a sequence is ``--seq_len`` of them.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import errors
from experiments import tasks
from experiments import text

VOCAB = 256  # bytes


class LanguageModel(tasks.Task):
  """Bytes of text; next-byte cross-entropy; bits per byte (module docstring)."""

  name = "lm"
  headline = "bits_per_byte"
  higher_is_better = False
  unit = "tokens"
  help = "a byte-level transformer language model; bits per byte"
  options = {
      "corpus": tasks.Option(
          "stdlib", "Text of the language model (--task=lm): stdlib (the running Python's "
          "standard library sources, offline), files (the text file or folder --data_dir), "
          "or a tensorflow-datasets text data set (tiny_shakespeare, lm1b, ...; --data_dir "
          "is then tfds' data folder)."),
      "seq_len": tasks.Option(128, "Bytes the language model reads per sequence (--task=lm)."),
      "n_layers": tasks.Option(2, "Transformer blocks of the language model (--task=lm)."),
      "d_model": tasks.Option(64, "Width of the language model (--task=lm)."),
      "n_heads": tasks.Option(4, "Attention heads of the language model (--task=lm)."),
      "train_sequences": tasks.Option(
          None, "Train on a random subset of this many sequences (--task=lm); default all.",
          int),
      "test_sequences": tasks.Option(
          256, "Validate on a random subset of this many sequences (--task=lm; 0: all).", int),
  }

  def validate(self, config) -> None:
    for name in ("seq_len", "n_layers", "d_model", "n_heads"):
      if not getattr(config, name) > 0:
        raise errors.InputError(f"--{name} must be > 0, got {getattr(config, name)}.")
    if config.d_model % config.n_heads:
      raise errors.InputError(f"--d_model={config.d_model} must be divisible by "
                              f"--n_heads={config.n_heads}.")
    if config.train_sequences is not None and not config.train_sequences > 0:
      raise errors.InputError(f"--train_sequences must be > 0, got {config.train_sequences}.")
    if config.corpus == text.STDLIB and config.data_dir:
      raise errors.InputError(f"--data_dir={config.data_dir} with --corpus=stdlib: give "
                              "--corpus=files to read it (or a catalog name, whose tfds data "
                              "folder it is).")
    if not config.test_sequences >= 0:
      raise errors.InputError(f"--test_sequences must be >= 0 (0: all), got "
                              f"{config.test_sequences}.")

  def data_key(self, config) -> Any:
    subset = config.train_sequences is not None or config.test_sequences
    return (config.corpus, config.data_dir, config.seq_len, config.train_sequences,
            config.test_sequences, config.seed if subset else None)  # (subsets: the seed)

  def load(self, config) -> text.TextData:
    data = text.load(config.data_dir, config.seq_len, config.corpus)
    rng = np.random.default_rng(config.seed)
    train, test = data.train, data.test
    if config.train_sequences is not None:
      train = _subset(rng, train, config.train_sequences, "--train_sequences")
    if config.test_sequences:
      test = _subset(rng, test, min(config.test_sequences, test.shape[0]), "--test_sequences")
    return text.TextData(train, test, data.source, data.train_bytes, data.test_bytes,
                         data.train_files, data.test_files)

  def arrays(self, data: text.TextData) -> tuple[Any, Any]:
    return {"tokens": data.train}, {"tokens": data.test}

  def describe(self, data: text.TextData) -> dict[str, Any]:
    return data.describe()

  def chance(self, data) -> float:
    return math.log2(VOCAB)

  def units(self, config) -> int:
    return config.seq_len

  def create_model(self, config, data):
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from normreg import models  # pylint: disable=g-import-not-at-top
    return models.Transformer(vocab=VOCAB, layers=config.n_layers, width=config.d_model,
                              heads=config.n_heads, qk_norm="head", post_norm=True,
                              epsilon=config.norm_eps or 1e-6, rngs=nnx.Rngs(config.seed))

  def matrix_axes(self, config, params) -> Any:
    """Muon's matrices: each head's q, k, v ``(d, d_h)``, the output projection ``(heads
    * d_h, d)`` and the MLP's; the embeddings, the head and the norms' scales go to Adam
    (as in Muon's practice)."""
    from optax import contrib  # pylint: disable=g-import-not-at-top
    from normreg import groups  # pylint: disable=g-import-not-at-top

    def axes(path, x):
      name = groups.path_str(path)
      if name.startswith(("embed", "head")) or x.ndim < 2:
        return None
      if x.ndim == 3:  # attention: (heads, d, d_h), or o: (heads, d_h, d)
        return contrib.MuonDimensionNumbers((0, 1), 2) if name.endswith("/o") else (
            contrib.MuonDimensionNumbers(1, 2))
      return contrib.MuonDimensionNumbers(0, 1)

    return jax.tree_util.tree_map_with_path(axes, params)

  def prepare(self, config, batch, stats, key: Optional[jax.Array]) -> jax.Array:
    return batch["tokens"][:, :-1].astype(jnp.int32)

  def loss(self, config, outputs, batch) -> jax.Array:
    return _token_losses(outputs, batch).mean()

  def train_metrics(self, config, outputs, batch) -> dict[str, jax.Array]:
    return {"bits_per_byte": _token_losses(outputs, batch).mean() / jnp.log(2.0)}

  def eval_sums(self, config, outputs, batch, weights) -> dict[str, jax.Array]:
    per_sequence = _token_losses(outputs, batch).sum(-1)
    return {"nats": jnp.sum(per_sequence * weights),
            "tokens": jnp.sum(weights) * outputs.shape[1]}

  def eval_metrics(self, config, sums: dict[str, float], n: int) -> dict[str, float]:
    loss = sums["nats"] / sums["tokens"]
    return {"loss": loss, "bits_per_byte": loss / math.log(2)}


def _token_losses(logits: jax.Array, batch) -> jax.Array:
  """Each position's next-byte cross-entropy, nats, float32 ``(batch, seq_len)``."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), batch["tokens"][:, 1:].astype(jnp.int32))


def _subset(rng: np.random.Generator, array: np.ndarray, size: int, flag: str) -> np.ndarray:
  if size > array.shape[0]:
    raise errors.InputError(f"{flag}={size} is more than the {array.shape[0]} sequences there "
                            "are; lower it, or leave it unset for all of them.")
  return array[np.sort(rng.choice(array.shape[0], size, replace=False))]


TASK = tasks.register(LanguageModel())
