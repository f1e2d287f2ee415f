"""Experiments with normreg: data, models, training loop and launcher (not part of the library)."""
