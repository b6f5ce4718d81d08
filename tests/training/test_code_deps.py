"""The import closure of a stage module (l2rclip.training.code_deps): the errors it gives."""

import pytest

from l2rclip.training.code_deps import import_closure


@pytest.mark.parametrize("name", ["l2rclip.stages.no_such_stage", "numpy"])
def test_a_module_that_is_no_source_of_the_package_is_named_in_the_error(name):
    with pytest.raises(
        ValueError, match=rf"{name}: expected a module of the l2rclip package, found no source file"
    ):
        import_closure(name)
