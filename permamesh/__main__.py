"""``python -m permamesh``: same as the ``permamesh`` command."""

import sys

from permamesh.cli import main

sys.exit(main())
