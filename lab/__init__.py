"""The namespace lab: throwaway network namespaces for tests, the demo and benchmarks.

Not part of tproxyd: it lives in the checkout beside tests/ and bench/, is importable from there
only (`python -m lab demo` at the top of the checkout; pytest and `python -m bench` put it on the
path), and never ships. It creates and sweeps namespaces by name, which the daemon and `tproxy`
must never be able to do: tests/unit/test_layout.py holds them to that.

    python -m lab demo            # the README's main job
    python -m lab listen PORT     # a transparent listener (inside a lab namespace)
"""

from .netns import LAN, PREFIX, ROOT, WAN, Lab, Side, run_own_lab, sweep_stale, wait_for_port

__all__ = ["LAN", "PREFIX", "ROOT", "WAN", "Lab", "Side", "run_own_lab", "sweep_stale", "wait_for_port"]
