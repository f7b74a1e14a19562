"""A TCP echo server like Istio's tcp-echo sample."""
