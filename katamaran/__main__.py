"""`python -m katamaran` is the `katamaran` command."""

import sys

from .cli import main

sys.exit(main())
