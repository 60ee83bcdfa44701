import math
import time

import pytest
import torch

from neodragon.training.trainer import TrainConfig, Trainer, cycle_indices, lr_lambda, read_log


class Interrupted(Exception):
    pass


def make_trainer(tmp_path, stop_at=None, max_steps=6, max_minutes=None, step_seconds=0.0, ema_decay=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    data = torch.randn(1000, 4, generator=torch.Generator().manual_seed(1))

    def batch_fn(step, rank, world):
        if step == stop_at:
            raise Interrupted
        time.sleep(step_seconds)
        return {"x": data[list(cycle_indices(step, rank, world, 4))]}

    def loss_fn(batch):
        loss = model(batch["x"]).square().mean()  # dropout makes the run depend on the restored RNG state
        return {"loss": loss, "extra": loss.detach() * 2}

    config = TrainConfig(output_dir=str(tmp_path), max_steps=max_steps, batch_size=4, warmup_steps=2,
                         save_every=3, log_every=1, learning_rate=1e-2, max_minutes=max_minutes,
                         ema_decay=ema_decay)
    return Trainer(config, {"model": model}, batch_fn, loss_fn)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    straight = make_trainer(tmp_path / "a")
    straight.fit()
    interrupted = make_trainer(tmp_path / "b", stop_at=3)
    with pytest.raises(Interrupted):
        interrupted.fit()
    resumed = make_trainer(tmp_path / "b")
    assert resumed.resume() == 3
    resumed.fit()
    for a, b in zip(straight.unwrap("model").parameters(), resumed.unwrap("model").parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    log = read_log(tmp_path / "b")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in log] == [r["loss"] for r in read_log(tmp_path / "a")]
    assert (tmp_path / "b" / "train_config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step_3", "step_6"]


def test_weight_average_resumes_and_swaps_in_only_inside_the_block(tmp_path):
    straight = make_trainer(tmp_path / "a", ema_decay=0.5)
    straight.fit()
    interrupted = make_trainer(tmp_path / "b", stop_at=4, ema_decay=0.5)
    with pytest.raises(Interrupted):
        interrupted.fit()
    resumed = make_trainer(tmp_path / "b", ema_decay=0.5)
    resumed.resume()
    resumed.fit()
    for a, b in zip(straight.ema.shadow_params, resumed.ema.shadow_params, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    model = resumed.unwrap("model")
    last = [p.detach().clone() for p in model.parameters()]
    with resumed.averaged_weights():
        averaged = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), last, strict=True))  # restored afterwards
    assert not any(torch.equal(a, b) for a, b in zip(averaged, last, strict=True))  # an average, not the last


def test_weight_average_needs_a_checkpoint_that_has_one(tmp_path):
    make_trainer(tmp_path, max_steps=3).fit()
    with pytest.raises(FileNotFoundError, match="without --ema-decay"):
        make_trainer(tmp_path, ema_decay=0.9).resume()
    with pytest.raises(ValueError, match="between 0 and 1"):
        TrainConfig(output_dir=str(tmp_path), ema_decay=1.5)


def test_frozen_model_is_an_error(tmp_path):
    model = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        Trainer(TrainConfig(output_dir=str(tmp_path)), {"m": model}, lambda *a: {}, lambda b: {})


def test_cycle_indices_are_disjoint_across_ranks_and_steps():
    seen = [i for step in range(3) for rank in range(2) for i in cycle_indices(step, rank, 2, 4)]
    assert sorted(seen) == list(range(24))


def test_time_budget_stops_early_saves_and_anneals(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=10_000, max_minutes=0.6 / 60, step_seconds=0.05)
    trainer.fit()
    assert 2 < trainer.step < 100  # stopped by the clock, far before max_steps
    assert (tmp_path / "checkpoints" / f"step_{trainer.step}").is_dir()  # the stop is resumable
    lrs = [r["lr"] for r in read_log(tmp_path)]
    # Step-based progress is ~0 at 10,000 steps, so any decay after the warm-up comes from the time budget.
    assert lrs[-1] < 0.5 * max(lrs)


def test_lr_schedule_follows_whichever_budget_runs_out_first():
    config = TrainConfig(output_dir="unused", max_steps=1000, warmup_steps=10)
    assert lr_lambda(config)(5) == pytest.approx(0.6)  # warm-up
    assert lr_lambda(config, lambda: 0.5)(10) == pytest.approx(0.55)  # half the time: cosine midpoint
    assert lr_lambda(config, lambda: 1.0)(10) == pytest.approx(0.1)
    steps_ahead = lr_lambda(config, lambda: 0.1)(10 + 990 // 2)
    assert steps_ahead == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 495 / 990)))
