"""`python -m chatforge.cli` = the `chatforge` command."""
import sys

from chatforge.cli import main

sys.exit(main())
