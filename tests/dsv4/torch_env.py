"""Find or build the PyTorch side environment for the DeepSeek-V4 parity tests and the peers bench.

A Python 3.11 virtual environment (`tests/dsv4/.torch-venv`, git-ignored) with the CPU build of
torch that lies on these machines' disk, transformers (which carries `DeepseekV4HyperConnection`)
and `hyper-connections`. Built once, cached; a file lock keeps two pytest-xdist workers from
building it twice. Arrays cross between the two Pythons as `.npz` files.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VENV = os.environ.get("MHC_TORCH_VENV", os.path.join(HERE, ".torch-venv"))
PINS = ("torch==2.13.0", "transformers==5.18.0", "safetensors")
PEER_PINS = ("hyper-connections==0.4.9",)          # optional: only the peers comparison needs it
_STAMP = "mhc-torch-env-" + "-".join(PINS + PEER_PINS)


def find_python311() -> str | None:
  """A Python 3.11 interpreter (the only one with a CPU torch wheel on disk here), or None."""
  cands = [os.environ.get("MHC_TORCH_PYTHON"), "/root/.pyenv/versions/3.11.7/bin/python",
           shutil.which("python3.11")]
  pyenv = os.path.expanduser("~/.pyenv/versions")
  if os.path.isdir(pyenv):
    cands += [os.path.join(pyenv, v, "bin/python") for v in sorted(os.listdir(pyenv))
              if v.startswith("3.11")]
  cands.append(shutil.which("python3"))
  for c in cands:
    if not c or not os.path.exists(c):
      continue
    try:
      out = subprocess.run([c, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                           text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      continue
    if out == "(3, 11)":
      return c
  return None


def venv_python() -> str:
  return os.path.join(VENV, "bin", "python")


def ensure() -> tuple[str | None, str]:
  """Return `(python, message)`; python is None (with the reason) when no env can be had."""
  stamp = os.path.join(VENV, _STAMP)
  if os.path.exists(stamp):
    return venv_python(), "cached"
  base = find_python311()
  if base is None:
    return None, ("no Python 3.11 found (tried MHC_TORCH_PYTHON, ~/.pyenv/versions/3.11*, python3.11, "
                  "python3): the DeepSeek-V4 parity tests need it for the on-disk CPU torch wheel")
  os.makedirs(os.path.dirname(VENV), exist_ok=True)
  with open(VENV + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)           # a second worker waits here, then sees the stamp
    if os.path.exists(stamp):
      return venv_python(), "cached"
    t0 = time.time()
    if os.path.exists(VENV):
      shutil.rmtree(VENV)
    subprocess.run([base, "-m", "venv", VENV], check=True)
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run([venv_python(), "-m", "pip", "install", "-q", *PINS], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
      raise RuntimeError(f"building {VENV} failed (pip install {' '.join(PINS)}):\n"
                         + proc.stdout[-3000:] + proc.stderr[-3000:])
    peer = subprocess.run([venv_python(), "-m", "pip", "install", "-q", *PEER_PINS], env=env,
                          capture_output=True, text=True)
    if peer.returncode:
      open(os.path.join(VENV, "peers-missing.txt"), "w").write(peer.stdout[-2000:] + peer.stderr[-2000:])
    open(stamp, "w").write(f"built in {time.time() - t0:.1f}s\n")
    return venv_python(), f"built in {time.time() - t0:.1f}s"


def peers_missing() -> str | None:
  """Why `hyper-connections` could not be installed into the env, or None if it is there."""
  path = os.path.join(VENV, "peers-missing.txt")
  return open(path).read() if os.path.exists(path) else None


def run(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
  """Run `script` (a path) with the torch env's Python; raise with its output on failure."""
  py, msg = ensure()
  if py is None:
    raise RuntimeError(msg)
  env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
             TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
  proc = subprocess.run([py, script, *args], capture_output=True, text=True, env=env,
                        timeout=timeout)
  if proc.returncode:
    raise RuntimeError(f"{os.path.basename(script)} failed (rc={proc.returncode}):\n"
                       + proc.stdout[-4000:] + proc.stderr[-4000:])
  return proc


if __name__ == "__main__":
  py, msg = ensure()
  print(py, msg)
  sys.exit(0 if py else 1)
