"""The relay worker's start: what it keeps for its whole life is out of the collector's sight."""

from __future__ import annotations

import gc

from tproxyd.relay.__main__ import freeze_for_life
from tproxyd.state.config import Cidr
from tproxyd.state.routes import RouteTable
from tproxyd.state.upstreams import RouteRule


def test_a_workers_routes_are_not_walked_by_a_full_collection():
    nets = tuple(Cidr(4, 0xC6120000 + (i << 8), 24) for i in range(5_000))
    rules = [RouteRule(name=f"r{i}", via=("direct",), destinations=nets[i::10]) for i in range(10)]
    table = RouteTable(rules)
    try:
        freeze_for_life()
        walked = {id(o) for o in gc.get_objects()}  # what a full collection would walk
        assert id(rules) not in walked and id(table.routes) not in walked
        assert not any(id(c) in walked for c in rules[0].destinations[:100])
        assert gc.get_freeze_count() >= len(rules[0].destinations)
        later = [object()]  # what comes after is collected as ever
        assert id(later) in {id(o) for o in gc.get_objects()}
    finally:
        gc.unfreeze()  # pytest goes on in this process
