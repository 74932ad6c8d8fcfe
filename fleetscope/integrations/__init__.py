"""Framework integrations: each imports its framework lazily, so the client stays dependency-free.

- `fleetscope.integrations.ddp.instrument_ddp(model, run)`: time each rank's arrival at DDP's
  first all-reduce and its communication, the signals that find a straggler.
- `fleetscope.integrations.hf.FleetscopeCallback`: a Hugging Face `transformers` TrainerCallback.
- `fleetscope.integrations.lightning.FleetscopeCallback`: a PyTorch Lightning Callback.
"""

import functools
import logging

log = logging.getLogger("fleetscope.integrations")


def guarded(fn):
    """A framework callback must never break training: log what fails at debug level and carry on."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            fn(*args, **kwargs)
        except Exception:
            log.debug("fleetscope callback %s failed", fn.__name__, exc_info=True)

    return wrapper
