"""``python -m attn_probe.cli``: the ``attn-probe`` command."""

import sys

from .main import main

sys.exit(main())
