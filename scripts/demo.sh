#!/usr/bin/env bash
# The main job on the builtin defaults, as far as this build goes: validate every example
# policy (with made-up credentials in the environment) and create the sandbox CA.
set -euo pipefail
cd "$(dirname "$0")/.."
keyhole=.build/debug/keyhole
state=${KEYHOLE_STATE_DIR:-.keyhole-demo}

# Made-up values for the example policies' from_env secrets; the check must never print them.
export GITHUB_TOKEN=ghp_demo0000000000000000000000000000000
export OPENAI_API_KEY=sk-demo-000000000000000000
export MAPS_API_KEY=maps-demo-key-0000

echo "== keyhole policy check policies/*.yaml"
$keyhole policy check --verbose policies/*.yaml
echo
echo "== keyhole ca init --state-dir $state"
$keyhole ca init --state-dir "$state"
echo
echo "== keyhole ca show --state-dir $state (what a guest installs in its trust store)"
$keyhole ca show --state-dir "$state" | head -3
echo "   ..."
echo
echo "== keyhole rewrite: a guest's request stream through the engine (policies/github.yaml)"
printf 'GET /user HTTP/1.1\r\nHost: api.github.com\r\nAuthorization: Bearer $MSB_GITHUB_TOKEN\r\n\r\n' |
  $keyhole rewrite --policy policies/github.yaml --sni api.github.com | sed 's/ghp_demo[0-9]*/ghp_demo… (real value, shown here because this is the demo)/'
echo
echo "== the same placeholder sent to another host is blocked (exit 3)"
printf 'GET /collect HTTP/1.1\r\nHost: attacker.example\r\nAuthorization: Bearer $MSB_GITHUB_TOKEN\r\n\r\n' |
  $keyhole rewrite --policy policies/github.yaml --sni attacker.example || echo "exit status $?"
