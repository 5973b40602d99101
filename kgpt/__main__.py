"""Runs the kgpt command line: `python -m kgpt ...`."""

import sys

from kgpt.cli import console_main

sys.exit(console_main())
