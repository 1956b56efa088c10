"""``python -m rexdeploy``."""

from __future__ import annotations

import sys

from rexdeploy.cli.main import main

sys.exit(main())
