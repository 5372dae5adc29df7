"""`python -m tests.faults.driver FAULT CLI-ARGS...`: the `mhc-jax` CLI with one fault installed.

  hang-save    from the second checkpoint save on, Orbax's `CheckpointManager.save` never returns
               (what a save that cannot start looks like from the main thread)
  disk-full    after the first checkpoint, the file system reports no free space
"""
import os
import sys
import threading


def _hang_save():
  import orbax.checkpoint as ocp
  orig, calls = ocp.CheckpointManager.save, [0]

  def save(self, *a, **kw):
    calls[0] += 1
    if calls[0] >= 2:
      threading.Event().wait()
    return orig(self, *a, **kw)
  ocp.CheckpointManager.save = save


def _disk_full():
  real = os.statvfs

  def statvfs(path):
    st = real(path)
    d = os.fspath(path)
    if os.path.basename(d) == "checkpoints" and any(n.isdigit() for n in os.listdir(d)):
      return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, 0, 0, st.f_files, st.f_ffree,
                                st.f_favail, st.f_flag, st.f_namemax))
    return st
  os.statvfs = statvfs


FAULTS = {"hang-save": _hang_save, "disk-full": _disk_full}

if __name__ == "__main__":
  FAULTS[sys.argv[1]]()
  from mhc_jax.cli import main
  sys.exit(main(sys.argv[2:]))
