#!/usr/bin/env bash
# Builds the real-cluster binaries for the e2e suite from the Go module proxy:
#   kube-apiserver (k8s.io/kubernetes), etcd and etcdctl (go.etcd.io/etcd); and on request
#   (`cluster-bins.sh kubectl`) kubectl, for the migrate comparison of the scale suite.
# Output: ${KUBEKMS_CACHE:-$HOME/.cache/kubekms}/bin/{kube-apiserver,etcd,etcdctl[,kubectl]}.
# Idempotent: each binary is built once per version into $CACHE/build/<name>-<version>/
# with a stamp file; a second run only re-links bin/. Prebuilt binaries given in
# KUBE_APISERVER=, ETCD=, ETCDCTL= or KUBECTL= are linked instead of building.
# The wrapper Go modules live under the cache dir, never in the repo.
set -euo pipefail

KUBE_VERSION="${KUBE_VERSION:-v1.37.2}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
CACHE="${KUBEKMS_CACHE:-$HOME/.cache/kubekms}"
BIN="$CACHE/bin"
BUILD="$CACHE/build"
mkdir -p "$BIN" "$BUILD"

# Wrapper modules must not inherit the repo's workspace or vendor settings.
export GOWORK=off GOFLAGS="${GOFLAGS:-} -mod=mod"

log() { printf '[cluster-bins] %s\n' "$*" >&2; }

# link NAME PATH: point $BIN/NAME at PATH.
link() {
  ln -sfn "$2" "$BIN/$1.tmp.$$" && mv -Tf "$BIN/$1.tmp.$$" "$BIN/$1"
  log "$1 -> $2"
}

# prebuilt ENVVAR NAME: link a prebuilt binary if ENVVAR is set; returns 1 otherwise.
prebuilt() {
  local p="${!1:-}"
  [ -n "$p" ] || return 1
  [ -x "$p" ] || { log "$1=$p is not an executable file"; exit 1; }
  link "$2" "$(readlink -f "$p")"
}

# timed NAME CMD...: run CMD and print how long it took.
timed() {
  local name="$1" start end
  shift
  start=$(date +%s)
  "$@"
  end=$(date +%s)
  log "built $name in $((end - start))s"
}

# build_kube NAME: build k8s.io/kubernetes/cmd/NAME at KUBE_VERSION.
build_kube() {
  local name="$1"
  local dir="$BUILD/$name-$KUBE_VERSION"
  local stamp="$dir/.stamp"
  if [ -f "$stamp" ] && [ -x "$dir/$name" ]; then
    link "$name" "$dir/$name"; return
  fi
  mkdir -p "$dir/src"
  local minor; minor="$(echo "$KUBE_VERSION" | cut -d. -f2)"
  local staging="v0.${KUBE_VERSION#v1.}" # v1.37.2 -> v0.37.2
  log "building $name $KUBE_VERSION (cold build: ~15 min on 2 cores, ~3 GB Go build cache; less once another k8s binary is built)"
  (
    cd "$dir/src"
    local gomod
    gomod="$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
    [ -f "$gomod" ] || { log "cannot find go.mod of k8s.io/kubernetes@$KUBE_VERSION"; exit 1; }
    {
      echo "module kubekms.local/$name-build"
      echo
      echo "go 1.26"
      echo
      echo "require k8s.io/kubernetes $KUBE_VERSION"
      echo
      # Each staging module kubernetes requires at v0.0.0 (replaced by ./staging upstream).
      grep -Eo '^[[:space:]]*k8s\.io/[^[:space:]]+ v0\.0\.0([[:space:]]|$)' "$gomod" | awk '{print $1}' | sort -u |
        while read -r m; do echo "replace $m => $m $staging"; done
    } >go.mod
    printf '//go:build tools\n\npackage tools\n\nimport _ "k8s.io/kubernetes/cmd/%s"\n' "$name" >tools.go
    go mod download k8s.io/kubernetes
    go get "k8s.io/kubernetes/cmd/$name@$KUBE_VERSION" >/dev/null
    timed "$name" go build -trimpath -o "$dir/$name" \
      -ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor" \
      "k8s.io/kubernetes/cmd/$name"
  )
  date -u +%FT%TZ >"$stamp"
  link "$name" "$dir/$name"
}

# build_etcd NAME MODULE PKG: build PKG of MODULE@ETCD_VERSION as NAME.
build_etcd() {
  local name="$1" mod="$2" pkg="$3"
  local dir="$BUILD/$name-$ETCD_VERSION"
  local stamp="$dir/.stamp"
  if [ -f "$stamp" ] && [ -x "$dir/$name" ]; then
    link "$name" "$dir/$name"; return
  fi
  mkdir -p "$dir/src"
  log "building $name $ETCD_VERSION"
  (
    cd "$dir/src"
    printf 'module kubekms.local/%s-build\n\ngo 1.26\n' "$name" >go.mod
    go get "$mod@$ETCD_VERSION" >/dev/null
    timed "$name" go build -trimpath -ldflags="-s -w" -o "$dir/$name" "$pkg"
  )
  date -u +%FT%TZ >"$stamp"
  link "$name" "$dir/$name"
}

if [ "${1:-all}" = kubectl ]; then # optional: only the scale suite's migrate comparison needs it
  prebuilt KUBECTL kubectl || build_kube kubectl
  "$BIN/kubectl" version --client | sed -n 1p
  exit 0
fi
prebuilt ETCD etcd || build_etcd etcd go.etcd.io/etcd/server/v3 go.etcd.io/etcd/server/v3
prebuilt ETCDCTL etcdctl || build_etcd etcdctl go.etcd.io/etcd/etcdctl/v3 go.etcd.io/etcd/etcdctl/v3
if [ "${1:-all}" = etcd ]; then # `cluster-bins.sh etcd`: only what the unit tests need
  "$BIN/etcd" --version | sed -n 1p
  exit 0
fi
prebuilt KUBE_APISERVER kube-apiserver || build_kube kube-apiserver

"$BIN/kube-apiserver" --version
# sed, not head: head would close the pipe early and SIGPIPE the writer under pipefail.
"$BIN/etcd" --version | sed -n 1p
"$BIN/etcdctl" version | sed -n 1p
