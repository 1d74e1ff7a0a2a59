"""Fixtures shared by the benchmark suites."""

import pytest


@pytest.fixture(scope="module")
def cases(request):
    """``get(name)``: the calling module's ``CASES[name]()``, built once per
    module and checked (every implementation agrees) before any timing."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = request.module.CASES[name]()
            built[name].check()
        return built[name]

    return get
