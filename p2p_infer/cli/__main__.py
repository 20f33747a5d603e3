"""``python -m p2p_infer.cli``: the same as the ``p2p-infer`` script."""

import sys

from . import main

sys.exit(main())
