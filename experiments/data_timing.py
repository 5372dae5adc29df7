"""Time the built-in corpus: first build of the full stdlib corpus, then the cached reopen.

Each phase runs in a fresh subprocess (so the reopen pays imports and file hashing, as a new
`mhc-jax train` would). Writes `experiments/results/data_timing.json`.

    python -m experiments.data_timing [--seq-len 256 --batch-size 16]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

from experiments.common import metadata, out_dir, save_json

_PHASE = """
import json, sys, time
t0 = time.perf_counter()
from mhc_jax.data import DataConfig, make_eval_batches, make_train_iterator
from mhc_jax.data import corpus, sources
t_import = time.perf_counter() - t0
cfg = DataConfig(data_dir=sys.argv[1], seq_len=int(sys.argv[2]), batch_size=int(sys.argv[3]))
t0 = time.perf_counter(); files = corpus.list_corpus_files(cfg); t_list = time.perf_counter() - t0
t0 = time.perf_counter(); it = make_train_iterator(cfg); t_open = time.perf_counter() - t0
t0 = time.perf_counter(); next(it); t_first = time.perf_counter() - t0
n = 200
t0 = time.perf_counter()
for _ in range(n):
  next(it)
t_steady = (time.perf_counter() - t0) / n
t0 = time.perf_counter(); make_eval_batches(cfg, 8); t_eval = time.perf_counter() - t0
train = sources.open_split(cfg, "train"); val = sources.open_split(cfg, "validation")
print(json.dumps(dict(import_s=t_import, list_files_s=t_list, open_train_iterator_s=t_open,
                      first_batch_s=t_first, steady_batch_ms=1e3 * t_steady, eval_8_batches_s=t_eval,
                      files=len(files), bytes=sum(len(open(p, "rb").read()) for _, p in files),
                      train_examples=len(train), validation_examples=len(val))))
"""


def _phase(cache: str, seq_len: int, batch_size: int) -> dict:
  t0 = time.perf_counter()
  out = subprocess.run([sys.executable, "-c", _PHASE, cache, str(seq_len), str(batch_size)],
                       capture_output=True, text=True, check=True)
  res = json.loads(out.stdout.strip().splitlines()[-1])
  res["process_wall_s"] = time.perf_counter() - t0
  return {k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--seq-len", type=int, default=256)
  ap.add_argument("--batch-size", type=int, default=16)
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  with tempfile.TemporaryDirectory() as cache:
    first = _phase(cache, args.seq_len, args.batch_size)
    reopen = _phase(cache, args.seq_len, args.batch_size)
  res = {"experiment": "data_timing", "corpus": "stdlib", "seq_len": args.seq_len,
         "batch_size": args.batch_size, "first_build": first, "cached_reopen": reopen,
         **metadata()}
  path = save_json(res, out_dir(args.out) / "data_timing.json")
  print(json.dumps(res, indent=1))
  print("saved", path)


if __name__ == "__main__":
  main()
