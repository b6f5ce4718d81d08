"""The stage entry point shared by every DVC stage (l2rclip.stages.common.run_main)."""

import logging

import pytest

from l2rclip.stages.common import run_main


@pytest.fixture(autouse=True)
def _logging_as_it_was():
    level = logging.getLogger("l2rclip").level
    yield
    logging.getLogger("l2rclip").setLevel(level)


@pytest.mark.parametrize(("result", "status"), [({"images": 3}, 0), ({}, 0), (0, 0), (3, 3)])
def test_a_finished_stage_exits_0_and_an_exit_status_is_kept(result, status):
    assert run_main(lambda: result) == status


def test_a_known_error_is_one_line_and_exit_2(capsys):
    def fail() -> int:
        raise ValueError("data.root: expected a folder, found nothing")

    assert run_main(fail) == 2
    assert capsys.readouterr().err == "error: data.root: expected a folder, found nothing\n"
