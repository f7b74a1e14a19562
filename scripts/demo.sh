#!/usr/bin/env bash
# The main job: set everything up, bring up a 2-node local cluster, deploy Bookinfo and the sleep
# client, put Bookinfo in the mesh, and show it working: a request through ztunnel's HBONE tunnels,
# the callers' SPIFFE identities as the destination saw them, the mutual-TLS metrics, and a connection
# denied by an AuthorizationPolicy; then a waypoint for L7: a canary split of reviews between v1 and v2
# and a request denied by an L7 policy (403). Run as root on Debian. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
A=.venv/bin/ambientctl
PY=.venv/bin/python

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "bring up a 2-node local cluster"
$A up --nodes 2
$A apply -f samples/bookinfo/bookinfo.yaml >/dev/null
$A apply -f samples/sleep/sleep.yaml >/dev/null
$A wait --for=condition=ready pod --all -n bookinfo --timeout=120s >/dev/null
$A wait --for=condition=ready pod -l app=sleep -n default --timeout=120s >/dev/null
$A get pods -A -o wide

step "put bookinfo in the mesh (no restarts)"
$A label namespace bookinfo istio.io/dataplane-mode=ambient --overwrite
for _ in $(seq 1 100); do
  enrolled=$($A get pods -n bookinfo -o json | $PY -c 'import json,sys; items=json.load(sys.stdin)["items"]; print(all((p["metadata"].get("annotations") or {}).get("ambient.istio.io/redirection")=="enabled" for p in items))')
  [ "$enrolled" = True ] && break
  sleep 0.2
done
echo "every bookinfo pod: ambient.istio.io/redirection=enabled"

step "ambientctl exec deploy/sleep -- curl http://productpage.bookinfo:9080/productpage"
for _ in 1 2 3; do
  page=$($A exec deploy/sleep -- curl -s --max-time 10 http://productpage.bookinfo:9080/productpage)
  echo "$page" | grep -o '<title>[^<]*</title>' | head -1
  echo "$page" | grep -E -o 'Reviews served by: <span[^>]*>[^<]*' | sed 's/<span[^>]*>//'
done

step "open connections with the callers' SPIFFE identities, as the destination ztunnels see them"
$A ztunnel-config connections --node all --details || true
STATE=$($A status | awk '/state dir/{print $3}')

step "mutual TLS in the metrics (node-1 ztunnel, reporter=destination)"
curl -s http://172.30.0.11:15020/metrics | grep '^istio_tcp_connections_opened_total{reporter="destination"' \
  | grep 'mutual_tls' | sed -E 's/.*source_principal="([^"]*)".*destination_workload="([^"]*)".*connection_security_policy="([^"]*)".*\} (.*)/  \1 -> \2  [\3]  \4 connections/' | head -5 || true

step "deny: only productpage may call details (an L4 AuthorizationPolicy on ztunnel)"
cat <<'YAML' | $A apply -f -
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: details-from-productpage, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: details}}
  action: ALLOW
  rules: [{from: [{source: {principals: ["cluster.local/ns/bookinfo/sa/bookinfo-productpage"]}}]}]
YAML
sleep 1
if $A exec deploy/sleep -- curl -s --max-time 5 http://details.bookinfo:9080/details/0 >/dev/null; then
  echo "sleep -> details: allowed (unexpected)"
else
  echo "sleep -> details: refused (plaintext caller, no identity)"
fi
$A exec deploy/sleep -- curl -s --max-time 10 http://productpage.bookinfo:9080/productpage | grep -q 'Book Details' \
  && echo "productpage -> details: still allowed (its SPIFFE identity matches)"
grep -h 'allow policies exist, but none allowed\|explicitly denied' "$STATE"/logs/ztunnel-node-*.log | tail -1 \
  | sed -E 's/.*src.workload="([^"]*)".*dst.workload="([^"]*)".*error="([^"]*)".*/  access log: \1 -> \2 denied: \3/' || true
$A delete authorizationpolicies details-from-productpage -n bookinfo >/dev/null

step "deploy a waypoint for bookinfo (L7)"
$A waypoint apply -n bookinfo --enroll-namespace --wait

# Requests from inside the mesh (productpage's pod) to reviews, counted by the pod that answered.
count_reviews() {
  $A exec -n bookinfo deploy/productpage-v1 -- "$PWD/$PY" -c '
import collections, json, urllib.request
seen = collections.Counter()
for _ in range(200):
    with urllib.request.urlopen("http://reviews:9080/reviews/0", timeout=10) as r:
        seen[json.load(r)["podname"].rsplit("-", 2)[0]] += 1
print("  200 requests:", ", ".join(f"{pod} {n}" for pod, n in sorted(seen.items())))'
}

step "L7 canary: reviews 90% v1 / 10% v2 (DestinationRule subsets + VirtualService weights)"
cat <<'YAML' | $A apply -f -
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}, {name: v3, labels: {version: v3}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews, subset: v2}, weight: 10}
YAML
sleep 1
count_reviews

step "L7 deny: reviews accepts only GET from productpage (AuthorizationPolicy on the waypoint)"
cat <<'YAML' | $A apply -f -
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-get-from-productpage, namespace: bookinfo}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/bookinfo/sa/bookinfo-productpage"]}}]
    to: [{operation: {methods: [GET]}}]
YAML
sleep 1
echo "  productpage GET  /reviews/0 -> $($A exec -n bookinfo deploy/productpage-v1 -- curl -s -o /dev/null -w '%{http_code}' http://reviews:9080/reviews/0)"
echo "  productpage POST /reviews/0 -> $($A exec -n bookinfo deploy/productpage-v1 -- curl -s -X POST -w ' %{http_code}' http://reviews:9080/reviews/0)"
echo "  ratings     GET  /reviews/0 -> $($A exec -n bookinfo deploy/ratings-v1 -- curl -s -w ' %{http_code}' http://reviews:9080/reviews/0)"
$A logs -n bookinfo deploy/waypoint | grep 'request denied' | tail -1 | sed 's/^/  waypoint log: /' || true

step "the waypoint's metrics (reporter=waypoint)"
WAYPOINT_IP=$($A get pods -n bookinfo -l gateway.networking.k8s.io/gateway-name=waypoint -o json \
  | $PY -c 'import json,sys; print(json.load(sys.stdin)["items"][0]["status"]["podIP"])')
WAYPOINT_NODE=$($A get pods -n bookinfo -l gateway.networking.k8s.io/gateway-name=waypoint -o json \
  | $PY -c 'import json,sys; print(json.load(sys.stdin)["items"][0]["spec"]["nodeName"])')
ip netns exec "amb-$WAYPOINT_NODE" curl -s "http://$WAYPOINT_IP:15020/stats/prometheus" \
  | grep '^istio_requests_total{reporter="waypoint"' | grep 'destination_service_name="reviews"' \
  | sed -E 's/.*source_workload="([^"]*)".*destination_workload="([^"]*)".*response_code="([^"]*)".*\} (.*)/  \1 -> \2  \3  x\4/' || true
$A delete authorizationpolicies reviews-get-from-productpage -n bookinfo >/dev/null

echo
echo "The cluster stays up. Try: .venv/bin/ambientctl ztunnel-config workloads --node all"
echo "Tear it down with:        .venv/bin/ambientctl down"
