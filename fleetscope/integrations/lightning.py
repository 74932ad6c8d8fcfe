"""PyTorch Lightning: a Callback that reports every training batch with its phases to fleetscope.

    from fleetscope.integrations.lightning import FleetscopeCallback
    trainer = L.Trainer(..., callbacks=[FleetscopeCallback(job="resnet")])

Phases come from Lightning's hooks: `forward` (batch start to backward), `backward`, `optimizer`
(optimizer step to batch end). Validation is reported as a declared pause, and so is saving a
checkpoint (from `on_save_checkpoint`, when Lightning gathers its state, to the next hook, once it is
written). A fit resumed from a checkpoint (`ckpt_path`) declares the step it restored, for goodput.
The loss in the step's outputs is attached to the step.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import lightning.pytorch as lp

import fleetscope
from fleetscope.integrations import guarded

log = logging.getLogger("fleetscope.integrations.lightning")


class FleetscopeCallback(lp.Callback):
    def __init__(self, job: str | None = None, *, tokens_per_batch: Callable[[Any], int] | None = None, emitter=None) -> None:
        self.job = job
        self.tokens_per_batch = tokens_per_batch
        self.emitter = emitter
        self.run: fleetscope.TrainingRun | None = None
        self._step: Any = None
        self._mark = 0.0
        self._pause_t0: float | None = None
        self._save_t0: float | None = None
        self._restored: int | None = None

    def _phase(self, name: str) -> None:
        now = time.perf_counter()
        if self._step is not None:
            self._step.phases[name] = self._step.phases.get(name, 0.0) + (now - self._mark)
        self._mark = now

    @guarded
    def on_train_start(self, trainer, pl_module):
        job = self.job or type(pl_module).__name__
        self.run = fleetscope.training(job=job, rank=trainer.global_rank, world_size=trainer.world_size,
                                       local_rank=trainer.local_rank, emitter=self.emitter)
        restored = self._restored if self._restored is not None else trainer.global_step
        if restored:
            self.run.restored(restored)

    @guarded
    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        # Called while fit restores `ckpt_path`, before on_train_start makes the run.
        step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
        self._restored = int(step) if step is not None else None

    @guarded
    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self.run is not None and self._save_t0 is None:
            self._save_t0 = time.perf_counter()
            self.run._emit_pause("checkpoint", "begin", time.time(), None)

    def _end_save(self) -> None:
        """The checkpoint was written once Lightning calls its next hook."""
        if self.run is not None and self._save_t0 is not None:
            self.run._emit_pause("checkpoint", "end", time.time(), time.perf_counter() - self._save_t0)
        self._save_t0 = None

    @guarded
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._end_save()
        if self.run is None:
            return
        tokens = self.tokens_per_batch(batch) if self.tokens_per_batch else None
        samples = len(batch[0]) if isinstance(batch, (list, tuple)) and hasattr(batch[0], "__len__") else None
        self._step = self.run.step(tokens=tokens, samples=samples, number=trainer.global_step)
        self._step.__enter__()
        self._mark = time.perf_counter()

    @guarded
    def on_before_backward(self, trainer, pl_module, loss):
        self._phase("forward")

    @guarded
    def on_after_backward(self, trainer, pl_module):
        self._phase("backward")

    @guarded
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._step is None:
            return
        self._phase("optimizer")
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and hasattr(loss, "item"):
            self._step.record(loss=float(loss.item()))
        self._step.__exit__(None, None, None)
        self._step = None

    @guarded
    def on_train_epoch_end(self, trainer, pl_module):
        self._end_save()

    @guarded
    def on_train_end(self, trainer, pl_module):
        self._end_save()

    @guarded
    def on_validation_start(self, trainer, pl_module):
        self._end_save()
        if self.run is not None and trainer.state.fn == "fit":
            self._pause_t0 = time.perf_counter()
            self.run._emit_pause("validation", "begin", time.time(), None)

    @guarded
    def on_validation_end(self, trainer, pl_module):
        if self.run is not None and self._pause_t0 is not None:
            self.run._emit_pause("validation", "end", time.time(), time.perf_counter() - self._pause_t0)
            self._pause_t0 = None
