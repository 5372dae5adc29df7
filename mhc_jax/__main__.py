"""`python -m mhc_jax ...` = the `mhc-jax` command."""
import sys

from mhc_jax.cli import main

sys.exit(main())
