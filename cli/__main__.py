"""``python -m cli``: the same as the ``sentiment`` command."""

import sys

from cli.main import main

sys.exit(main())
