"""``python -m vi_lab``: the ``vi-lab`` command."""

import sys

from vi_lab.cli import main

sys.exit(main())
