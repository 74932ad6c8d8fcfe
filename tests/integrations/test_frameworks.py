"""Framework integrations with the real libraries, on tiny models built from a config, on the CPU."""

from __future__ import annotations

import json
import socket

import pytest

from fleetscope.client import Emitter

torch = pytest.importorskip("torch", reason="make test installs torch==2.13.0 (CPU)")


def drain(sock) -> list[dict]:
    sock.settimeout(0.5)  # everything was sent before: stop at the first pause
    events = []
    while True:
        try:
            events.append(json.loads(sock.recvfrom(65535)[0]))
        except socket.timeout:
            return events


def tiny_module(lightning):
    """A one-layer Lightning module (a validation step too, used when a validation loader is given)."""

    class Tiny(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(8, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.layer(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Tiny()


def test_hugging_face_trainer_reports_steps_losses_and_checkpoint_pauses(udp, tmp_path):
    transformers = pytest.importorskip("transformers")
    from fleetscope.integrations.hf import FleetscopeCallback

    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=100, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)  # random weights: nothing is downloaded
    data = [{"input_ids": torch.randint(0, 100, (16,)), "labels": torch.randint(0, 100, (16,))} for _ in range(24)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=2, logging_steps=2,
        save_strategy="steps", save_steps=3, report_to=[], use_cpu=True, disable_tqdm=True, run_name="tiny-gpt2",
    )
    callback = FleetscopeCallback(tokens_per_step=2 * 16, emitter=Emitter(udp.getsockname()))
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()

    events = drain(udp)
    steps = [e for e in events if e["kind"] == "step"]
    assert [s["step"] for s in steps] == [0, 1, 2, 3, 4, 5]
    assert all(s["job"] == "tiny-gpt2" and s["tokens"] == 32 and s["samples"] == 2 and s["duration_s"] > 0 for s in steps)
    assert any("loss" in s.get("metrics", {}) for s in steps)  # the logged loss rides on the next step
    pauses = [(e["reason"], e["phase"]) for e in events if e["kind"] == "pause"]
    assert pauses == [("checkpoint", "begin"), ("checkpoint", "end")] * 2  # saves after steps 3 and 6


def test_lightning_reports_steps_with_phases_and_validation_pauses(udp, tmp_path):
    lightning = pytest.importorskip("lightning.pytorch")
    from fleetscope.integrations.lightning import FleetscopeCallback

    dataset = torch.utils.data.TensorDataset(torch.randn(20, 8), torch.randn(20, 1))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    trainer = lightning.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                                default_root_dir=str(tmp_path),
                                callbacks=[FleetscopeCallback(job="tiny-lightning", emitter=Emitter(udp.getsockname()))])
    trainer.fit(tiny_module(lightning), loader, loader)

    events = drain(udp)
    steps = [e for e in events if e["kind"] == "step"]
    assert [s["step"] for s in steps] == [0, 1, 2, 3, 4]
    for s in steps:
        assert s["job"] == "tiny-lightning" and s["samples"] == 4
        assert {"forward", "backward", "optimizer"} <= set(s["phases"])
        assert sum(s["phases"].values()) <= s["duration_s"] * 1.01
        assert "loss" in s["metrics"]
    pauses = [(e["reason"], e["phase"]) for e in events if e["kind"] == "pause"]
    assert pauses == [("validation", "begin"), ("validation", "end")]
