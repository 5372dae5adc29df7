"""Developer tools run as `python -m mhc_jax.tools.<name>`; the library never imports this package.

  h100       compile for abstract NVIDIA H100 / H200 devices on a GPU-less host (the `gpu-aot` extra)
             and report per-kernel registers / shared memory / spills and per-program memory,
             bytes accessed and collectives.
  gpu_aot    the sweep over kernels and train steps that writes experiments/results/h100_aot_*.json.
  bench_gpu  `make bench-gpu`: every GPU figure the project wants, on one real H100 / H200.
"""
