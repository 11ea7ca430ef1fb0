import sys

from ctctl.cli import main

sys.exit(main())
