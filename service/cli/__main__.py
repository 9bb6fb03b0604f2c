"""`python -m service.cli` is `unroll`, from this checkout's code."""

import sys

from service.cli.main import main

sys.exit(main())
