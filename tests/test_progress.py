import logging

from l2rclip.progress import LoggedProgress, progress


def test_outside_a_terminal_progress_is_logged_with_an_eta(caplog):
    ticks = iter(range(0, 1000, 10))  # each clock reading 10 s after the last
    logger = logging.getLogger("l2rclip.test_progress")
    bar = LoggedProgress(range(6), "training", 6, "batch", logger, interval=20.0, clock=lambda: next(ticks))
    bar.set_postfix(loss="0.5")
    with caplog.at_level(logging.INFO, logger="l2rclip.test_progress"):
        assert list(bar) == list(range(6))
    # items end at 10, 20, ... 60 s: lines at 20 s (2 done) and 40 s, 60 s
    assert caplog.messages[0] == "training: 2/6 batch (33%), 20 s elapsed, ETA 40 s; loss 0.5"
    assert caplog.messages[-1] == "training: 6/6 batch (100%), 60 s elapsed, ETA 0 s; loss 0.5"
    assert len(caplog.messages) == 3


def test_quiet_progress_is_the_items_themselves():
    items = [1, 2]
    assert progress(items, "x", 2, "batch", logging.getLogger("l2rclip"), quiet=True) is items
