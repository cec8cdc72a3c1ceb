"""`python -m trm.cli ...`: the same as the `trm` command (the demo starts its worker this way)."""
import sys

from trm.cli import main

sys.exit(main())
