"""`python -m fastwidth ...` is the `fastwidth` command."""
import sys

from fastwidth.cli import main

sys.exit(main())
