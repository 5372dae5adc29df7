"""Analysis helpers for the experiments and notebooks: signal propagation, gains over depth, stats."""
from mhc_jax.analysis.birkhoff import birkhoff_decompose, recompose
from mhc_jax.analysis.propagation import (composite_gains_over_depth, gain_summary, mixing_matrices,
                                          sinkhorn_errors, sinkhorn_or_exp)
from mhc_jax.analysis.stats import mean_std

__all__ = ["birkhoff_decompose", "recompose", "mixing_matrices", "sinkhorn_or_exp", "composite_gains_over_depth", "gain_summary",
           "sinkhorn_errors", "mean_std"]
