"""`python -m pytest_katamaran.bench`."""

from __future__ import annotations

import sys

from pytest_katamaran.bench.cli import main

sys.exit(main())
