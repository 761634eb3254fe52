"""The thin layer that talks to the kernel: reads live state and applies planned operations.

pyroute2 for rules and routes, the nftables binding (JSON) for the ruleset, /proc/sys for sysctls.
"""
