"""`python -m jaxdiff`: the same as the `jaxdiff` command."""

import sys

from jaxdiff.cli import main

sys.exit(main())
