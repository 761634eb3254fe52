"""Pure core of tproxyd: config schema and loader, desired and live kernel state, the planner.

Nothing in this package performs a syscall or talks netlink: it is tested without root.
"""
