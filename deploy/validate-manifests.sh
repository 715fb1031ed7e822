#!/usr/bin/env bash
# Validates Remora's Kubernetes manifests against the Kubernetes API schema,
# offline, with kubernetes-validate (PyPI): every YAML file in
# deploy/kubernetes/ and deploy/kubernetes/ha/ (the highly available
# layout), and what `remoractl inject` makes of every file in
# examples/kubernetes/. Also checks that ha/sidecar-example.yaml is still
# what `remoractl inject` writes.
#
#   bash deploy/validate-manifests.sh
#
# Environment:
#   VENV         the Python venv to use, made and filled when needed
#                (default /tmp/remora-venv)
#   K8S_VERSION  the Kubernetes version to validate against (default 1.33.0,
#                the first where native sidecars are GA)
#   REMORACTL    the remoractl binary (default target/debug/remoractl, built
#                when missing)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv=${VENV:-/tmp/remora-venv}
k8s_version=${K8S_VERSION:-1.33.0}
remoractl=${REMORACTL:-target/debug/remoractl}

if [[ ! -x $venv/bin/kubernetes-validate ]]; then
    echo "installing kubernetes-validate into $venv" >&2
    [[ -x $venv/bin/python ]] || python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet kubernetes-validate
fi
if [[ ! -x $remoractl ]]; then
    echo "building remoractl" >&2
    cargo build --quiet -p remora-control --bin remoractl
fi

validate() {
    "$venv/bin/kubernetes-validate" --kubernetes-version "$k8s_version" --strict --quiet "$@"
}

failed=0
for f in deploy/kubernetes/*.yaml deploy/kubernetes/ha/*.yaml; do
    if validate "$f"; then
        echo "ok      $f"
    else
        echo "FAILED  $f"
        failed=1
    fi
done

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# The HA sidecar example: its header, then inject's output verbatim.
ha=deploy/kubernetes/ha/sidecar-example.yaml
ha_url=https://remora-control-replicas.remora-system.svc:4200
if "$remoractl" inject --control-plane "$ha_url" -f examples/kubernetes/web-deployment.yaml \
        >"$out/ha-sidecar.yaml" 2>"$out/notes" &&
    sed '1,/^# ---- remoractl inject output$/d' "$ha" | diff -u - "$out/ha-sidecar.yaml" >"$out/ha.diff"; then
    echo "ok      $ha is remoractl inject's output"
else
    cat "$out/notes" "$out/ha.diff" >&2
    echo "FAILED  $ha is not what remoractl inject --control-plane $ha_url writes"
    failed=1
fi
for f in examples/kubernetes/*.yaml; do
    injected=$out/$(basename "$f")
    # The notes on stderr say what happened to each workload.
    if ! "$remoractl" inject -f "$f" >"$injected" 2>"$out/notes"; then
        cat "$out/notes" >&2
        echo "FAILED  remoractl inject -f $f"
        failed=1
        continue
    fi
    if validate "$injected"; then
        echo "ok      remoractl inject -f $f"
    else
        echo "FAILED  remoractl inject -f $f"
        failed=1
    fi
done

if [[ $failed != 0 ]]; then
    echo "some manifests are not valid Kubernetes $k8s_version" >&2
    exit 1
fi
echo "all manifests are valid Kubernetes $k8s_version"
