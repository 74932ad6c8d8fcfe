"""A worker target that dies at once (tests/collector/test_decoders.py), in a module that imports nothing."""

import os


def die_at_once(channel) -> None:
    os._exit(3)
