"""Runs the kgpt command line: `python -m kgpt ...`."""

import sys

from kgpt.cli import main

sys.exit(main())
