"""ztunnel: the node L4 proxy of ambient mode, in Istio's in-pod mode.

Per enrolled pod (handed over by the CNI node agent through ZDS) it listens inside the pod's network
namespace on 15001 (outbound capture), 15006 (inbound plaintext), 15008 (inbound HBONE) and 15053 (DNS),
routes outbound connections over HBONE mTLS (PROTOCOLS.md §6-§7), authorizes inbound ones (§5.3), and
serves admin, metrics and readiness on 15000/15020/15021. The sans-IO cores (`decision`, `authz`, `dns`)
hold the protocol logic; the rest is the asyncio shell around them.
"""
