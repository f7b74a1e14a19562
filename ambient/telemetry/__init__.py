"""Telemetry shared by ztunnel and the waypoint: Istio's label sets (`labels`), a counter registry cheap
enough for the data path (`registry`), and non-blocking log lines in ztunnel's formats (`logs`)."""
