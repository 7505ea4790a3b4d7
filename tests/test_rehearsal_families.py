"""The README's real-model commands (tests/test_rehearsal.py) on every other supported
family: every command of the `<!-- rehearsal` block, in order, on a tiny byte-level
checkpoint of the family under configs/base.py, with the same trait files, datasets, judge
server and checks as the paper configs there."""
import pytest

import test_rehearsal as rehearsal
from test_rehearsal import envs  # noqa: F401 (the per-target fixture)


@pytest.mark.parametrize("target,index", rehearsal.cases(rehearsal.FAMILY_TARGETS))
def test_readme_command_on_family(envs, target, index):  # noqa: F811
    rehearsal.run_and_check(envs, target, index)
