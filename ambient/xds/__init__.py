"""Delta xDS for the workload model (PROTOCOLS.md §5): server, client, and the client's workload store."""
