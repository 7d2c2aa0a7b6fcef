"""`python -m nsync_jax.cli`: the `nsync-jax` command."""
import sys

from nsync_jax.cli import main

sys.exit(main())
