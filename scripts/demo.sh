#!/usr/bin/env bash
# The main job: set everything up, bring up a 2-node local cluster, deploy Bookinfo and the sleep
# client, and show a request going through. Run as root on Debian. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
A=.venv/bin/ambientctl

$A up --nodes 2
$A apply -f samples/bookinfo/bookinfo.yaml
$A apply -f samples/sleep/sleep.yaml
$A wait --for=condition=ready pod --all -n bookinfo --timeout=120s >/dev/null
$A wait --for=condition=ready pod -l app=sleep -n default --timeout=120s >/dev/null
echo
$A get pods -A -o wide
echo
echo "\$ ambientctl exec deploy/sleep -- curl -s http://productpage.bookinfo:9080/productpage"
page=$($A exec deploy/sleep -- curl -s --max-time 10 http://productpage.bookinfo:9080/productpage)
echo "$page" | grep -o '<title>[^<]*</title>'
echo "$page" | grep -E -o 'Reviews served by: <span[^>]*>[^<]*' | sed 's/<span[^>]*>//'
echo
echo "The cluster stays up. Try: .venv/bin/ambientctl get pods -n bookinfo -o wide"
echo "Tear it down with:        .venv/bin/ambientctl down"
