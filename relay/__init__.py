"""The data plane: a single-threaded selectors relay bound to the IP_TRANSPARENT listeners."""
