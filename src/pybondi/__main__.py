"""`python -m pybondi`: the `pybondi` command."""

import sys

from pybondi.cli import main

sys.exit(main())
