"""``python -m grao.cli``: the ``grao`` command (as used under ``torchrun`` and ``accelerate launch``)."""

import sys

from grao.cli import main

sys.exit(main())
