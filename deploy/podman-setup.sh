#!/usr/bin/env bash
# Podman for building and running the images without an image registry
# (deploy/build-images.sh). Root only; idempotent: CI calls it on every run.
#
#   - installs podman, runc and catatonit (and iptables, whose binaries the
#     remora-init image is packaged from) when missing;
#   - writes /etc/containers/containers.conf only when absent or different:
#     runc instead of the default crun, which fails on hybrid cgroup (v1 + v2)
#     hosts, cgroupfs instead of systemd, and ulimits no higher than the
#     host's, since raising rlimits is not permitted in every sandbox.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "podman-setup.sh: run as root" >&2
  exit 1
fi

need=()
for pkg in podman runc catatonit iptables; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$' \
    || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
  echo "podman-setup.sh: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

conf=/etc/containers/containers.conf
want='[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1000:1000"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"'
if [ ! -f "$conf" ] || [ "$(cat "$conf")" != "$want" ]; then
  mkdir -p /etc/containers
  [ -f "$conf" ] && cp "$conf" "$conf.bak"
  printf '%s\n' "$want" >"$conf"
  echo "podman-setup.sh: wrote $conf"
fi

podman --version
