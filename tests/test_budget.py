"""budget_minutes: a run sized from a measured step time so that its whole schedule ends within the budget."""
import json
import logging
import time

import pytest

from dino_ray.core.train.budget import plan_budget, planned
from dino_ray.core.train.loop import train_dino


def test_the_planner_keeps_the_epochs_and_sizes_them_and_replans_what_is_left(tiny_cfg):
    cfg = tiny_cfg(epochs=6, budget_minutes=5.0)
    plan = plan_budget(cfg, step_seconds=0.5)  # a fake step time: 5 min x 0.97 / 0.5 s
    assert (plan.epochs, plan.epoch_length, plan.steps) == (6, 97, 582)
    assert planned(cfg, plan).epoch_length == 97 and planned(cfg, plan).epochs == 6
    assert "budget 5 min: 0.500 s a step measured -> 6 epochs x 97 iterations" in plan.line()
    # resumed after 2 of 6 epochs and 2 minutes, on a machine twice as slow: the 4 epochs left share 3 minutes
    again = plan_budget(cfg, step_seconds=1.0, spent_minutes=2.0, epochs_done=2)
    assert (again.epochs, again.epoch_length) == (6, 43)
    assert "4 epochs x 43 iterations" in again.line() and "2.0 spent on 2 epochs" in again.line()
    with pytest.raises(ValueError, match="with data_loader: ray_data an epoch is a whole pass"):
        tiny_cfg(budget_minutes=5.0, data_loader="ray_data")  # no epoch length to size
    with pytest.raises(ValueError, match="budget_minutes must be > 0"):
        tiny_cfg(budget_minutes=0)


def test_a_budgeted_run_completes_its_schedule_within_its_minutes(tiny_cfg, caplog):
    cfg = tiny_cfg(epochs=2, budget_minutes=0.15, min_lr=1e-4)
    with caplog.at_level(logging.INFO, logger="dino_ray"):
        train_dino(cfg, show_progress=False)
    assert "budget 0.15 min" in caplog.text and "epochs x" in caplog.text
    lines = [json.loads(line) for line in open(f"{cfg.output_dir}/log.txt")]
    assert [line["epoch"] for line in lines] == [0, 1]
    length = lines[0]["train_plan_epoch_length"]
    assert length >= 2 and lines[-1]["train_budget_minutes"] == 0.15
    # the schedule ran to its end: the cosine's last value, about min_lr
    assert lines[-1]["train_lr"] == pytest.approx(1e-4, rel=0.05)
    # what was planned fits the budget at the measured step time (the minutes themselves: benchmarks, not tests):
    # the first plan, and the second epoch's, re-planned from the first one's cost
    assert 2 * length * lines[0]["train_plan_step_seconds"] <= 0.15 * 60
    assert (lines[0]["train_minutes"] * 60 + lines[1]["train_plan_epoch_length"] * lines[1]["train_plan_step_seconds"]
            <= 0.15 * 60)


def test_a_run_slower_than_its_first_measure_shortens_the_epochs_left(tiny_cfg, caplog):
    """The first plan times a few steps alone; what shares the machine over an epoch (here a hook that takes two
    seconds, as a slow checkpoint upload would) shows at the next epoch, which re-plans the rest of the budget."""
    cfg = tiny_cfg(epochs=3, budget_minutes=0.2, min_lr=1e-4, log_freq=1)
    logged = []
    with caplog.at_level(logging.INFO, logger="dino_ray"):
        train_dino(cfg, show_progress=False, on_epoch_end=lambda epoch, stats, path: time.sleep(2.0 if epoch == 0
                                                                                                  else 0.0),
                   on_step=lambda iteration, metrics: logged.append(iteration))
    assert "re-planned from the epochs so far" in caplog.text
    lines = [json.loads(line) for line in open(f"{cfg.output_dir}/log.txt")]
    lengths = [line["train_plan_epoch_length"] for line in lines]
    assert lengths[1] < lengths[0]  # the 2 seconds are taken from the epochs left
    # and the epochs left fit what is left of the budget at the step time the re-plan measured
    left = 0.2 * 60 * 0.97 - lines[0]["train_minutes"] * 60
    assert lengths[1] * lines[1]["train_plan_step_seconds"] <= left / 2
    assert lines[-1]["train_lr"] == pytest.approx(1e-4, rel=0.05)  # and the schedule still runs to its end
    assert lines[-1]["train_minutes"] > lines[0]["train_minutes"] + 2.0 / 60  # the minutes count the hook's time
    # the logged iterations count the steps taken, whatever each epoch's length: 0, 1, 2, ... once each
    assert logged == list(range(sum(line["train_steps"] for line in lines)))
