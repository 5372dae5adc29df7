"""Real 2-process `jax.distributed` run on loopback (2 processes x 4 CPU devices).

Trains 3 steps under FSDP, saves collectively, restores onto an FSDP x TP mesh, trains 2 more; the
losses must equal a single-process 8-device run that trains under DP and restores onto a (2, 1, 4)
TP mesh.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

WORKER = os.path.join(os.path.dirname(__file__), "mp_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(nproc, devices, workdir, strat_a, strat_b):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
    env.pop(var, None)
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, WORKER, str(i), str(nproc), port, str(workdir),
                             strat_a, strat_b], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(nproc)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=600)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  with open(os.path.join(workdir, "losses.json")) as f:
    return json.load(f)


def test_two_processes_train_save_restore_other_strategy_match_one_process(tmp_path):
  multi = _launch(2, 4, tmp_path / "multi", "fsdp", "fsdp_tp:1,4,2")
  single = _launch(1, 8, tmp_path / "single", "dp", "tp:2,1,4")
  assert multi["processes"] == 2 and multi["devices"] == 8
  assert multi["mesh_b"] == {"data": 1, "expert": 1, "fsdp": 4, "tensor": 2}
  assert len(multi["losses"]) == 5
  np.testing.assert_allclose(multi["losses"], single["losses"], rtol=2e-5)
  assert multi["losses"][-1] < multi["losses"][0]        # it actually trains
