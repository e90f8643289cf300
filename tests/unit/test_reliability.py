"""Reliability on the real path: the progress watchdog (a stall injected into one of two real
processes), the loss-spike guard (a poisoned batch) and host memory across many saves."""

import itertools
import logging
import time

import pytest

from lmjax.config import RunConfig
from lmjax.data import pipeline
from lmjax.train import hooks, watchdog


def test_watchdog_deadline_follows_the_measured_steps_and_fires_with_the_stacks(capfd):
    dog = watchdog.Watchdog(10.0, 0.2, 5.0)  # not armed (no step began): only the arithmetic
    assert dog._deadline == 5.0  # the first step compiles
    dog.on_metrics(1, {}, 4.0)  # includes the compilation: not a step time
    assert dog._deadline == 5.0
    dog.on_metrics(2, {}, 0.01)
    assert dog._deadline == pytest.approx(0.2)  # 10 x 0.01 s is under the floor
    dog.on_metrics(3, {}, 0.05)
    assert dog._deadline == pytest.approx(0.5)
    with dog.busy("save"):
        assert dog._deadline == 5.0  # the first save
    with dog.busy("save"):
        assert dog._deadline == pytest.approx(max(0.2, 10 * dog._kinds["save"][0]))
    assert dog._deadline == pytest.approx(0.5)
    exits = []
    armed = watchdog.Watchdog(10.0, 0.3, 0.3, exit=exits.append, poll_seconds=0.02)
    start = time.monotonic()
    armed.before_step(1)  # then nothing: fires after 0.3 s, dumps, waits 0.3 s, exits
    while not exits and time.monotonic() - start < 30:
        time.sleep(0.02)
    assert exits == [watchdog.STALL_EXIT] and time.monotonic() - start >= 0.6
    armed.stop()
    err = capfd.readouterr().err
    assert "most recent call first" in err and "test_watchdog_deadline_follows" in err


def _fired(dog: watchdog.Watchdog, exits: list, timeout: float = 30.0) -> None:
    start = time.monotonic()
    while not exits and time.monotonic() - start < timeout:
        time.sleep(0.02)
    dog.stop()


def test_watchdog_names_the_set_up_phase_and_the_end_of_the_run(caplog):
    """Each phase named by `expect` has its own deadline (set-up before any step); `on_end`
    names the end of the run; a disabled watchdog (run.watchdog_factor=0) never fires, and
    `watching` stops the watch when the run ends."""
    caplog.set_level(logging.ERROR, "lmjax")
    exits: list[int] = []
    dog = watchdog.Watchdog(10.0, 0.2, 5.0, exit=exits.append, poll_seconds=0.02)
    dog.expect("the mesh")  # watched from here, with the startup deadline
    dog.expect("the resume decision", 0.2)  # the mesh was progress; nothing after it
    _fired(dog, exits)
    assert exits == [watchdog.STALL_EXIT]
    assert "(deadline 0.2 s) while waiting for the resume decision" in caplog.text
    ended: list[int] = []
    dog = watchdog.Watchdog(10.0, 0.2, 0.2, exit=ended.append, poll_seconds=0.02)
    dog.before_step(1)
    dog.on_metrics(1, {}, 1.0)
    dog.on_end(None, False)  # then the last save never commits
    _fired(dog, ended)
    assert ended == [watchdog.STALL_EXIT] and "the last save's commit" in caplog.text
    off = watchdog.Watchdog(10.0, 0.01, 0.01, enabled=False, exit=exits.append)
    off.expect("anything")
    time.sleep(0.1)
    assert off._thread is None and exits == [watchdog.STALL_EXIT]
    with watchdog.watching(RunConfig(watchdog_startup_seconds=30.0)) as watch:
        watch.expect("the lease")
        assert watch._thread.is_alive()
    assert not watch._thread.is_alive()


def test_loss_guard_rejects_spikes_and_gives_up_after_max_rewinds():
    guard = hooks.LossGuard("stop", spike_factor=2.0, max_rewinds=1)

    def ok(loss):
        return {"loss": loss, "grad_norm": 1.0, "finite": 1.0}

    for step, loss in enumerate([9.0, 6.0, 5.0, 4.0, 4.0], start=1):
        guard.on_metrics(step, ok(loss), 0.1)  # falling losses are never spikes
    guard.on_metrics(6, ok(11.0), 0.1)  # below 2 x the mean of the last 5 (5.6)
    with pytest.raises(hooks.Rewind, match=r"loss 16 at step 7 is above .*=2 x .* 6 steps"):
        guard.on_metrics(7, ok(16.0), 0.1)
    guard.on_metrics(7, ok(16.0), 0.1)  # judged once: the save's check and the metrics agree
    guard.rewound(4)  # steps 5.. are judged again, with the history before them
    assert [s for s, _ in guard.accepted] == [1, 2, 3, 4]
    guard.on_metrics(5, ok(4.0), 0.1)
    with pytest.raises(FloatingPointError, match="gave up after checkpoint.max_rewinds=1"):
        guard.on_metrics(6, ok(100.0), 0.1)
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step 9"):
        guard.on_metrics(9, {"loss": float("nan"), "grad_norm": 1.0, "finite": 0.0}, 0.1)


def test_data_positions_skip_batches_from_any_start():
    for skipped in ([], [0], [3], [2, 3, 7], [0, 1, 5, 6]):
        naive = [p for p in range(40) if p not in skipped]
        for start in range(20):
            got = list(itertools.islice(pipeline.data_positions(start, skipped), 10))
            assert got == naive[start : start + 10], (skipped, start)


@pytest.mark.parametrize(
    "command",
    [
        ["eval", "--workdir", "w"],
        ["generate", "--workdir", "w", "--prompt", "x"],
        ["checkpoint", "export", "w", "--params-only", "out"],
        ["convert", "to-hf", "src", "out"],
    ],
)
def test_offline_commands_refuse_a_negative_watchdog_deadline_when_parsing(command, capsys):
    from lmjax import cli

    with pytest.raises(SystemExit) as stopped:
        cli.main([*command, "--watchdog-seconds", "-1"])
    assert stopped.value.code == 2
    assert "-1: give 0 (off) or a positive number" in capsys.readouterr().err
