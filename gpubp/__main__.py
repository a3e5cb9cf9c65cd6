"""``python -m gpubp``: the same as the ``gpubp`` command."""

import sys

from .cli import main

sys.exit(main())
