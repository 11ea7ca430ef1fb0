"""`python -m ctctl`: the command line (ctctl.cli)."""
import sys

from ctctl.cli import main

sys.exit(main())
