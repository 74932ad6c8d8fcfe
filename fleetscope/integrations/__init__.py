"""Framework integrations: each imports its framework lazily, so the client stays dependency-free.

- `fleetscope.integrations.ddp.instrument_ddp(model, run)`: time each rank's arrival at DDP's
  first all-reduce and its communication, the signals that find a straggler.
- `fleetscope.integrations.hf.FleetscopeCallback`: a Hugging Face `transformers` TrainerCallback.
- `fleetscope.integrations.lightning.FleetscopeCallback`: a PyTorch Lightning Callback.
"""
