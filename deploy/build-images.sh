#!/usr/bin/env bash
# Builds the three images without an image registry: static binaries built
# on the host, packaged FROM scratch by podman (no base image to pull).
#
#   deploy/podman-setup.sh            # once, as root: podman + containers.conf
#   deploy/build-images.sh [--check]  # from anywhere in the repository
#
# Images (the same as deploy/Dockerfile's targets, which need a registry for
# their rust and debian base images):
#   remora-proxy:latest    /remora-proxy, USER 2102:2102 (the sidecar)
#   remora-control:latest  /remora-control and /remoractl, USER 65532:65532
#   remora-init:latest     /remora-proxy init, USER 0:0, with the host's
#                          iptables (nft: xtables-nft-multi, its shared
#                          libraries and extensions), so the host needs
#                          Debian's `iptables` package (bookworm: 1.8.9)
#
# The binaries are `cargo build --release --target x86_64-unknown-linux-gnu`
# with +crt-static into $CARGO_TARGET_DIR (default target/static, apart from
# the workspace's usual target dir so neither waits on the other's lock or
# evicts the other's artifacts).
#
# Options:
#   --check           then run each image: --version of both binaries,
#                     iptables in remora-init, and a rule round trip (and
#                     `remora-proxy init`, once it exists) in a private
#                     network namespace with NET_ADMIN and NET_RAW
#   --profile NAME    cargo profile (default release; `dev` is faster to
#                     build, slower and bigger to run)
#   --no-build        package the binaries already in $CARGO_TARGET_DIR
#   --tag TAG         image tag (default latest)
# Environment: CARGO_TARGET_DIR, PODMAN (default podman), REMORA_INIT_ARGS
# (arguments the --check run gives `remora-proxy init`, default none).
set -euo pipefail
cd "$(dirname "$0")/.."

check=0 build=1 profile=release tag=latest
while [ $# -gt 0 ]; do
  case "$1" in
    --check) check=1 ;;
    --no-build) build=0 ;;
    --profile) profile="$2"; shift ;;
    --profile=*) profile="${1#*=}" ;;
    --tag) tag="$2"; shift ;;
    --tag=*) tag="${1#*=}" ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-images.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

podman=${PODMAN:-podman}
triple=x86_64-unknown-linux-gnu
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/static}
case "$profile" in
  dev) profile_dir=debug ;;
  *) profile_dir=$profile ;;
esac
bin_dir=$CARGO_TARGET_DIR/$triple/$profile_dir
ctx=$CARGO_TARGET_DIR/images
now() { date +%s; }
t0=$(now)

if [ "$build" = 1 ]; then
  echo "== static binaries (profile $profile, into $CARGO_TARGET_DIR)"
  RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static" \
    cargo build --profile "$profile" --target "$triple" \
      -p remora-proxy -p remora-control --bins
  echo "   built in $(($(now) - t0))s"
fi
for bin in remora-proxy remora-control remoractl; do
  if [ ! -x "$bin_dir/$bin" ]; then
    echo "build-images.sh: $bin_dir/$bin missing (drop --no-build?)" >&2
    exit 1
  fi
done
# Static: ldd finds nothing to load ("statically linked").
if ldd "$bin_dir/remora-proxy" 2>&1 | grep -q '=>'; then
  echo "build-images.sh: $bin_dir/remora-proxy is not static" >&2
  exit 1
fi

echo "== build context ($ctx)"
rm -rf "$ctx"
mkdir -p "$ctx/proxy" "$ctx/control" "$ctx/init/rootfs"
# Hard links when the context shares the target dir's file system.
put() { ln -f "$1" "$2" 2>/dev/null || cp -f "$1" "$2"; }
put "$bin_dir/remora-proxy" "$ctx/proxy/remora-proxy"
put "$bin_dir/remora-control" "$ctx/control/remora-control"
put "$bin_dir/remoractl" "$ctx/control/remoractl"

cat >"$ctx/proxy/Containerfile" <<'EOF'
FROM scratch
COPY remora-proxy /remora-proxy
USER 2102:2102
EXPOSE 4140 4143 4191
ENTRYPOINT ["/remora-proxy"]
EOF
cat >"$ctx/control/Containerfile" <<'EOF'
FROM scratch
COPY remora-control remoractl /
USER 65532:65532
EXPOSE 4200
ENTRYPOINT ["/remora-control"]
EOF

# remora-init's root file system: remora-proxy plus the host's iptables
# (nft variant) with exactly what it loads at run time.
root=$ctx/init/rootfs
xt_multi=/usr/sbin/xtables-nft-multi
xt_ext=/usr/lib/x86_64-linux-gnu/xtables   # compiled into libxtables
if [ ! -x "$xt_multi" ] || [ ! -d "$xt_ext" ]; then
  echo "build-images.sh: remora-init needs the host's iptables" \
    "($xt_multi, $xt_ext): apt-get install iptables" >&2
  exit 1
fi
# Copies a host file to the same place in the rootfs, following symlinks:
# its directory by real path (Debian's /lib is usr/lib), its name as given
# (a library's soname).
copy_host() {
  local dir
  dir=$(realpath "$(dirname "$1")")
  mkdir -p "$root$dir"
  cp -L "$1" "$root$dir/$(basename "$1")"
}
mkdir -p "$root/usr/sbin" "$root/usr/bin" "$root/usr/lib" "$root/usr/lib64" \
  "$root/etc" "$root/run" "$root/tmp"
chmod 1777 "$root/tmp"
for d in bin sbin lib lib64; do ln -s "usr/$d" "$root/$d"; done
put "$bin_dir/remora-proxy" "$root/remora-proxy"
copy_host "$xt_multi"
for name in iptables iptables-restore iptables-save \
            ip6tables ip6tables-restore ip6tables-save; do
  ln -s xtables-nft-multi "$root/usr/sbin/$name"
done
# The extensions are dlopen()ed by path as rules name them (tcp, multiport,
# owner, REDIRECT, ...): all of them, 2 MB.
mkdir -p "$root$xt_ext"
cp -a "$xt_ext/." "$root$xt_ext/"
# Every shared library the binary, its extensions and the dynamic loader
# need, as ldd resolves them on this host.
for f in "$xt_multi" "$xt_ext"/*.so; do ldd "$f"; done \
  | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' \
  | sort -u \
  | while read -r lib; do copy_host "$lib"; done
# Protocol names (-p tcp) as iptables-save prints them.
[ -f /etc/protocols ] && cp /etc/protocols "$root/etc/protocols"

cat >"$ctx/init/Containerfile" <<'EOF'
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin
USER 0:0
ENTRYPOINT ["/remora-proxy", "init"]
EOF

for image in proxy control init; do
  echo "== remora-$image:$tag"
  old=$("$podman" image inspect --format '{{.Id}}' "remora-$image:$tag" 2>/dev/null || true)
  # --layers=false: no intermediate images; the one a rebuild replaces goes.
  "$podman" build --quiet --layers=false --network none -t "remora-$image:$tag" \
    -f "$ctx/$image/Containerfile" "$ctx/$image"
  new=$("$podman" image inspect --format '{{.Id}}' "remora-$image:$tag")
  if [ -n "$old" ] && [ "$old" != "$new" ]; then
    "$podman" rmi "$old" >/dev/null 2>&1 || true
  fi
done
"$podman" images --filter "reference=remora-*:$tag"
echo "   images ready in $(($(now) - t0))s"

[ "$check" = 1 ] || exit 0

echo "== check"
run() {
  echo "\$ podman run --rm $*" >&2
  "$podman" run --rm "$@"
}
run --network none "remora-proxy:$tag" --version
run --network none "remora-control:$tag" --version
run --network none --entrypoint /remoractl "remora-control:$tag" --version
run --network none --entrypoint /remora-proxy "remora-init:$tag" --version
run --network none --entrypoint iptables "remora-init:$tag" --version
run --network none --entrypoint ip6tables "remora-init:$tag" --version
[ "$(run --network none --entrypoint /remora-proxy "remora-proxy:$tag" --version)" \
  = "$("$bin_dir/remora-proxy" --version)" ]
for want in proxy=2102:2102 control=65532:65532 init=0:0; do
  user=$("$podman" image inspect --format '{{.Config.User}}' "remora-${want%%=*}:$tag")
  [ "$user" = "${want#*=}" ] || { echo "remora-${want%%=*} runs as $user, not ${want#*=}" >&2; exit 1; }
done

# A private network namespace that successive containers share, as an init
# container and the pod's other containers do.
netns=$(mktemp -d)/netns
touch "$netns"
unshare --net="$netns" true
cleanup() { umount "$netns" 2>/dev/null || true; rm -rf "$(dirname "$netns")"; }
trap cleanup EXIT
pod=(--network "ns:$netns" --cap-drop all --cap-add NET_ADMIN --cap-add NET_RAW)

echo "-- nat rules round trip in a private network namespace"
rules='*nat
:REMORA_OUTPUT - [0:0]
-A OUTPUT -p tcp -j REMORA_OUTPUT
-A REMORA_OUTPUT -m owner --uid-owner 2102 -j RETURN
-A REMORA_OUTPUT -o lo -j RETURN
-A REMORA_OUTPUT -p tcp -m multiport --dports 4140,4143,4191 -j RETURN
-A REMORA_OUTPUT -p tcp -j REDIRECT --to-ports 4140
COMMIT'
for ipt in iptables ip6tables; do
  printf '%s\n' "$rules" | run -i "${pod[@]}" --entrypoint "$ipt-restore" "remora-init:$tag"
  saved=$(run "${pod[@]}" --entrypoint "$ipt-save" "remora-init:$tag" -t nat)
  printf '%s\n' "$saved"
  for want in '--uid-owner 2102 -j RETURN' '--to-ports 4140' 'multiport --dports 4140,4143,4191'; do
    grep -q -- "$want" <<<"$saved" || { echo "$ipt-save lacks: $want" >&2; exit 1; }
  done
  run "${pod[@]}" --entrypoint "$ipt" "remora-init:$tag" -t nat -F
  run "${pod[@]}" --entrypoint "$ipt" "remora-init:$tag" -t nat -X
done

if "$podman" run --rm --network none "remora-init:$tag" --help >/dev/null 2>&1; then
  echo "-- remora-proxy init (the image's entrypoint) in a fresh namespace"
  umount "$netns"
  unshare --net="$netns" true
  # shellcheck disable=SC2086 # word splitting is the point
  run "${pod[@]}" "remora-init:$tag" ${REMORA_INIT_ARGS:-}
  saved=$(run "${pod[@]}" --entrypoint iptables-save "remora-init:$tag" -t nat)
  printf '%s\n' "$saved"
  grep -q -- '-j REDIRECT' <<<"$saved" || { echo "init left no REDIRECT rule" >&2; exit 1; }
  run "${pod[@]}" --entrypoint ip6tables-save "remora-init:$tag" -t nat
else
  echo "-- remora-proxy has no init subcommand yet: skipped its run"
fi
echo "== images checked in $(($(now) - t0))s"
