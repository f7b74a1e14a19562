"""ZDS (PROTOCOLS §4): the sans-IO protocol core and the SEQPACKET channel, shared by the CNI agent and ztunnel."""
