"""Istio ambient's data plane in Python: shared library for ztunnel, waypoint, CNI and the local cluster."""
