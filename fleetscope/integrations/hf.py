"""Hugging Face `transformers`: a TrainerCallback that reports every optimizer step to fleetscope.

    from fleetscope.integrations.hf import FleetscopeCallback
    trainer = Trainer(..., callbacks=[FleetscopeCallback(job="llama-sft")])

Rank and world size come from the Trainer's arguments; the loss of each logging step is attached
to the next step; evaluation and checkpoint saving are reported as declared pauses (they begin
when the Trainer decides on them at the end of a step and end in on_evaluate / on_save). A run
resumed from a checkpoint (`resume_from_checkpoint`) declares the step it restored, for goodput.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from transformers import TrainerCallback

import fleetscope
from fleetscope.integrations import guarded

log = logging.getLogger("fleetscope.integrations.hf")


class FleetscopeCallback(TrainerCallback):
    def __init__(self, job: str | None = None, *, tokens_per_step: int | Callable[[], int] | None = None, emitter=None) -> None:
        self.job = job
        self.tokens_per_step = tokens_per_step
        self.emitter = emitter
        self.run: fleetscope.TrainingRun | None = None
        self._step: Any = None
        self._loss: float | None = None
        self._pauses: dict[str, float] = {}

    @guarded
    def on_train_begin(self, args, state, control, **kwargs):
        job = self.job or args.run_name or args.output_dir.rstrip("/").rsplit("/", 1)[-1]
        self.run = fleetscope.training(job=job, rank=args.process_index, world_size=args.world_size,
                                       local_rank=max(args.local_process_index, 0), emitter=self.emitter)
        if state.global_step > 0:  # resumed: the Trainer has loaded the checkpoint's state by now
            self.run.restored(state.global_step)

    @guarded
    def on_step_begin(self, args, state, control, **kwargs):
        if self.run is None:
            return
        tokens = self.tokens_per_step() if callable(self.tokens_per_step) else self.tokens_per_step
        samples = args.per_device_train_batch_size * args.gradient_accumulation_steps
        self._step = self.run.step(tokens=tokens, samples=samples, number=state.global_step)
        self._step.__enter__()

    @guarded
    def on_step_end(self, args, state, control, **kwargs):
        if self._step is None:
            return
        if self._loss is not None:
            self._step.record(loss=self._loss)
            self._loss = None
        self._step.__exit__(None, None, None)
        self._step = None
        if self.run is not None:
            for flag, reason in ((control.should_evaluate, "evaluation"), (control.should_save, "checkpoint")):
                if flag:
                    self._pauses[reason] = time.perf_counter()
                    self.run._emit_pause(reason, "begin", time.time(), None)

    def _end_pause(self, reason: str) -> None:
        t0 = self._pauses.pop(reason, None)
        if self.run is not None and t0 is not None:
            self.run._emit_pause(reason, "end", time.time(), time.perf_counter() - t0)

    @guarded
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._loss = float(logs["loss"])

    @guarded
    def on_evaluate(self, args, state, control, **kwargs):
        self._end_pause("evaluation")

    @guarded
    def on_save(self, args, state, control, **kwargs):
        self._end_pause("checkpoint")
