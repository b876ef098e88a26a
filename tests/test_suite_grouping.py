"""`make test` keeps the tests that hold a full-size model on one xdist worker (conftest.py), so that two of them
never need the machine's memory at once. The grouping has broken silently before (a conftest hook that ran after
xdist's, then pytest 9.2's node ids): this test fails when it does."""

import pytest


def test_full_size_tests_run_in_one_group_under_loadgroup(request):
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("only meaningful under `pytest -n N --dist loadgroup` (make test)")
    assert request.node.nodeid.endswith("@full-size"), request.node.nodeid
