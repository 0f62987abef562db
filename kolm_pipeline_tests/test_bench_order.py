"""The capture-proxy benchmark's turn order: balanced, so what one target leaves behind on the machine
(a writer's pages, a warm cache) lands on every other target alike."""

import collections
import importlib.util
import sys
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "proxy.py"
_SPEC = importlib.util.spec_from_file_location("kolm_bench_proxy", _SCRIPT)
assert _SPEC is not None and _SPEC.loader is not None
bench_proxy = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = bench_proxy  # its dataclasses look their module up there
_SPEC.loader.exec_module(bench_proxy)


@pytest.mark.parametrize("count", [2, 3, 4, 5, 6])
def test_every_target_follows_every_other_equally_often_over_a_cycle(count: int) -> None:
    names = [f"target {index}" for index in range(count)]
    cycle = bench_proxy.order_cycle(count)
    assert cycle == (count if count % 2 == 0 else 2 * count)
    orders = [bench_proxy.balanced_order(names, round_) for round_ in range(cycle)]

    assert all(sorted(order) == names for order in orders)
    firsts = collections.Counter(order[0] for order in orders)
    assert set(firsts) == set(names) and len(set(firsts.values())) == 1
    followers = collections.Counter(pair for order in orders for pair in zip(order, order[1:], strict=False))
    assert len(followers) == count * (count - 1)  # every ordered pair of distinct targets …
    assert len(set(followers.values())) == 1  # … equally often
    assert bench_proxy.balanced_order(names, cycle) == orders[0]
