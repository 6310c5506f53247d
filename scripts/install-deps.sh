#!/usr/bin/env bash
# Installs the Debian packages Keyhole builds and tests with, when any is missing.
# Idempotent and quiet when everything is present. Needs root (or sudo) to install.
set -euo pipefail

packages=(
  pkg-config libnetfilter-queue-dev libmnl-dev libssl-dev   # build: CNetfilterQueue
  zlib1g-dev                                                # build: compress-nio (gzip/deflate responses)
  iptables nftables iproute2 kmod                           # appliance: rules, namespaces, TAP
  dnsmasq-base curl openssl python3 procps psmisc iputils-ping # tests: resolver, clients, servers
  python3-requests python3-httpx nodejs                     # tests: runtimes with their own CA bundles
  python3-h2 python3-grpcio nghttp2-client                  # tests: HTTP/2 clients (httpx http2, gRPC, h2load)
  qemu-system-x86 cpio zstd xz-utils genisoimage            # launcher: guests, initramfs, cloud-init seed
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing: ${missing[*]}" >&2
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
