"""Shared by the quant tests: run `mhc-jax` in-process."""
from mhc_jax import cli


def run_cli(argv, capsys):
  """`(exit code, stdout, stderr)` of `mhc-jax argv`."""
  code = cli.main(argv)
  out, err = capsys.readouterr()
  return code, out, err
