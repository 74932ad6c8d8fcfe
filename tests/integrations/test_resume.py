"""The integrations say where an incarnation begins: a run resumed from a checkpoint declares the step it
restored (on its first step), and Lightning's checkpoint saves are declared pauses. Real libraries, CPU."""

from __future__ import annotations

import pytest

from fleetscope.client import Emitter
from tests.integrations.test_frameworks import drain, tiny_module

torch = pytest.importorskip("torch", reason="make test installs torch==2.13.0 (CPU)")


def test_a_hugging_face_run_resumed_from_a_checkpoint_declares_the_step(udp, tmp_path):
    transformers = pytest.importorskip("transformers")
    from fleetscope.integrations.hf import FleetscopeCallback

    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=100, n_positions=16)
    data = [{"input_ids": torch.randint(0, 100, (16,)), "labels": torch.randint(0, 100, (16,))} for _ in range(24)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=2, save_strategy="steps",
        save_steps=3, report_to=[], use_cpu=True, disable_tqdm=True, run_name="resumed-gpt2")

    def train(**kw) -> list[dict]:
        callback = FleetscopeCallback(emitter=Emitter(udp.getsockname()))
        model = transformers.GPT2LMHeadModel(config)
        transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train(**kw)
        return [e for e in drain(udp) if e["kind"] == "step"]

    first = train()
    assert [s["step"] for s in first] == [0, 1, 2, 3, 4, 5]
    assert "process_start_ts" in first[0] and "restored_step" not in first[0]
    again = train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))
    assert [s["step"] for s in again] == [3, 4, 5]
    assert again[0]["restored_step"] == 3 and "process_start_ts" in again[0]
    assert all("restored_step" not in s for s in again[1:])


def test_lightning_declares_checkpoint_saves_and_the_step_a_fit_resumed_from(udp, tmp_path):
    lightning = pytest.importorskip("lightning.pytorch")
    from fleetscope.integrations.lightning import FleetscopeCallback

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(24, 8), torch.randn(24, 1)), batch_size=4)

    def fit(**kw) -> list[dict]:
        saves = lightning.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, save_top_k=-1,
                                                    filename="{step}")
        trainer = lightning.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                                    enable_model_summary=False, default_root_dir=str(tmp_path),
                                    callbacks=[FleetscopeCallback(job="tiny", emitter=Emitter(udp.getsockname())), saves])
        trainer.fit(tiny_module(lightning), loader, **kw)
        return drain(udp)

    events = fit()
    steps = [e for e in events if e["kind"] == "step"]
    assert [s["step"] for s in steps] == [0, 1, 2, 3, 4, 5] and "restored_step" not in steps[0]
    pauses = [(e["reason"], e["phase"]) for e in events if e["kind"] == "pause"]
    assert pauses == [("checkpoint", "begin"), ("checkpoint", "end")] * 3  # after steps 2, 4 and 6
    end = next(e for e in events if e["kind"] == "pause" and e["phase"] == "end")
    assert end["duration_s"] > 0

    events = fit(ckpt_path=str(tmp_path / "ckpt" / "step=2.ckpt"))
    steps = [e for e in events if e["kind"] == "step"]
    assert [s["step"] for s in steps] == [2, 3, 4, 5]
    assert steps[0]["restored_step"] == 2 and all("restored_step" not in s for s in steps[1:])
