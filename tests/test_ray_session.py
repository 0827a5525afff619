"""One way to Ray for every command: ``ray_session`` joins or starts, ``map_tasks`` runs calls as Ray tasks in
order with a bar."""
import os
import time

import pytest
import ray

from dino_ray.platform.ray_session import map_tasks, ray_session


def niceness() -> int:
    return os.nice(0)


def environment(name: str) -> str | None:
    return os.environ.get(name)


def slow_power(base: int, exponent: int) -> int:
    time.sleep(0.3 * exponent)  # the first call finishes last: results still come back in the calls' order
    return base ** exponent


@pytest.mark.slow
def test_a_session_started_here_is_shut_down_and_a_held_one_is_left(capsys):
    assert not ray.is_initialized()
    with ray_session(num_cpus=2):
        assert ray.is_initialized()
        # its workers train at the plain loop's priority (Ray's default niceness, 15, yields to every daemon)
        assert ray.get(ray.remote(niceness).remote()) == niceness()  # the driver's (0 unless the tests run niced)
        # no watcher of node preemption on one machine: Ray Train's controller, a worker, reads it from its environment
        assert ray.get(ray.remote(environment).remote("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")) == "0"
        with ray_session():  # a command inside another (the quickstart's pretraining): joins, leaves it running
            assert map_tasks(slow_power, [(2, 3), (3, 2), (5, 1)], "powers", unit="call") == [8, 9, 5]
        assert ray.is_initialized()
    assert not ray.is_initialized()
    assert "powers: 100%" in capsys.readouterr().err  # the bar


def test_a_cluster_asking_for_its_token_says_what_to_do(monkeypatch):
    def refused(**kwargs):
        raise ConnectionError("Missing authentication token")

    monkeypatch.setattr(ray, "init", refused)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    with pytest.raises(RuntimeError, match="export RAY_AUTH_MODE=token .* ~/.ray/auth_token"):
        with ray_session():
            pass
