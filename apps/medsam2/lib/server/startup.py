"""A server that cannot start says why in one line, with exit status 2, not inside a uvicorn traceback."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from lib.engine.checkpoints import CheckpointError
from lib.server.server_process import in_server
from lib.settings import SettingError

logger = logging.getLogger(__name__)
STOP_PREFIX = "The MedSAM2 app cannot start: "


@contextmanager
def stop_in_one_line() -> Iterator[None]:
    """Around the app's start: inside the server, a bad ``--conf`` value, a checkpoint that cannot be had or a
    patch that cannot apply (SystemExit) ends the process with one line and exit status 2. Elsewhere (e.g. a
    training process, whose caller reports the failure) the exception goes on."""
    try:
        yield
    except (SystemExit, CheckpointError, SettingError) as e:
        if not in_server():
            raise
        # inside uvicorn's startup an exception is printed as a long traceback around the one line that matters
        message = str(e.code if isinstance(e, SystemExit) else e)
        logger.critical("%s%s", STOP_PREFIX, message)
        print(f"\n{STOP_PREFIX}{message}\n", file=sys.stderr, flush=True)
        os._exit(2)
