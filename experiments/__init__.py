"""Experiments that reproduce the HC / mHC papers' claims at small scale (see experiments/README.md)."""
