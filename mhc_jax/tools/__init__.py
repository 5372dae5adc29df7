"""Developer tools, benchmarks and experiment runners on top of the library: the library never imports
this package (tests/test_layers_imports.py); the command line (`mhc_jax.cli`) and `experiments/` do.

  compare_sharding  `mhc-jax compare-sharding`: the train step under each sharding strategy (presets
                    `sharding_small` / `sharding_1b` in `mhc_jax.configs`)
  hlo               collectives from compiled HLO (loop trip counts applied), array bytes, cost model
  bench_step        `mhc-jax bench step`: train-step time (wall and CPU), memory, MFU per connection
  bench_kernels     `mhc-jax bench kernels` (`make bench`): pre / post / connection kernels
  bench_moe         grouped vs dense-masked MoE
  kernel_aot        compile the kernels for a TPU topology or lower them for an abstract H100
  h100              compile for abstract NVIDIA H100 / H200 devices on a GPU-less host (the `gpu-aot`
                    extra) and report per-kernel registers / shared memory / spills and per-program
                    memory, bytes accessed and collectives
  gpu_aot           `make gpu-aot`: the sweep over kernels and train steps that writes
                    experiments/results/h100_aot_*.json
  bench_gpu         `make bench-gpu`: every GPU figure the project wants, on one real H100 / H200
  estimate          HBM-bound time estimates from the compiled bytes
  plots             `mhc-jax plot` (run curves) and the compare-sharding bar charts
  lm_runs           the LM experiments (experiments 2-4, notebook 02): runs, records, plots
  telephone         the telephone game (experiment 1, notebook 01)
  results, args     run metadata / JSON / figures; the shared `--preset` / `--set` flags
"""
