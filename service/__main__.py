"""`python -m service ...`: the same as the `claude-gateway` console script."""

import sys

from service.cli import main

sys.exit(main())
