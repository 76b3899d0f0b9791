"""`python -m pipelines COMMAND [ARGS]`: the user commands without installing their console scripts."""

import sys

from .commands import main

sys.exit(main())
