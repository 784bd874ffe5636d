"""`python -m gemmascope_jax.cli VERB ...`: the same as the `gemmascope-jax` console script."""

import sys

from gemmascope_jax.cli import main

sys.exit(main())
