"""ztunnel's per-pod proxies: listeners inside each pod's network namespace and the connection handlers
for its ports (15001 outbound, 15006 inbound plaintext, 15008 inbound HBONE, 15053 DNS)."""
