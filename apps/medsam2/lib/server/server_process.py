"""Which process this is: the MONAI Label server, or a training subprocess, a benchmark or a unit test that builds
the app too. The server's patches and background workers run inside the server only."""

from __future__ import annotations

import sys


def in_server() -> bool:
    """True inside the MONAI Label server process (``monailabel start_server`` imports ``monailabel.app`` before
    it creates the app); False in a training subprocess, a benchmark or a unit test."""
    return "monailabel.app" in sys.modules
