"""The experiment version: a hash of the measuring code, so moving code does not bump it."""
from vlab.run import registry
from vlab.run.registry import measuring_code

BEFORE = '''"""Module docstring."""
from vlab._kvm import Kvm   # where it came from
import numpy as np


def measure(state, loops):
    """Say what."""
    # a comment
    return state.run(loops) * 2
'''

MOVED = '''"""A new docstring after the move."""
import numpy as np
from vlab.vmm.kvm import Kvm


def measure(state, loops):
    from vlab.vmm import machine  # imported late now
    return state.run(loops)  *  2
'''

CHANGED = BEFORE.replace("* 2", "* 3")


def test_measuring_code_ignores_imports_docstrings_comments_and_layout():
    assert measuring_code(BEFORE) == measuring_code(MOVED)


def test_measuring_code_changes_with_the_code():
    assert measuring_code(BEFORE) != measuring_code(CHANGED)


def test_a_function_left_with_only_a_docstring_still_parses_as_code():
    assert "Pass" in measuring_code('def f():\n    """only this"""\n')


def test_every_experiment_has_a_version_from_its_source():
    exps = registry.discover()
    assert len(exps) >= 30
    for exp in exps.values():
        v = exp.version()
        assert len(v) == 12 and int(v, 16) >= 0, exp.name
