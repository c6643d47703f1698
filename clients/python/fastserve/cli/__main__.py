"""`python -m fastserve.cli`, the same as the `fastserve` console script."""

import sys

from fastserve.cli import main

sys.exit(main())
