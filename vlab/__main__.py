"""`python -m vlab` is the `vlab` command."""
import sys

from .cli import main

sys.exit(main())
