"""``python -m mlaas4hep``: the same as the ``mlaas4hep`` command."""

import sys

from mlaas4hep.cli.main import main

sys.exit(main())
