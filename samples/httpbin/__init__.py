"""An httpbin-like echo server: the universal test backend of Istio's docs."""
