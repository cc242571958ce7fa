"""``python -m fastface ...``: the same as the ``fastface`` command."""
import sys

from fastface.cli import main

sys.exit(main())
