#!/usr/bin/env bash
# `make image`: builds the release image from the unchanged Containerfile with
# podman (installed and configured by hack/install-podman.sh).
#
#   hack/image.sh            the default image (cgo, PKCS#11 support):  $IMAGE
#   hack/image.sh static     CGO_ENABLED=0 on a static runtime base:    $IMAGE-static
#
# Base images: the Containerfile's defaults (golang:1.26-trixie and
# distroless) when a registry answers; otherwise (this project's machines)
# local ones made offline by hack/image-bases.sh from Debian bookworm and this
# host's Go, passed as build args. KUBEKMS_IMAGE_BASES=registry|local forces
# one; GO_IMAGE / RUNTIME_IMAGE given in the environment are used as they are.
# Prints the image name on the last line.
set -euo pipefail
cd "$(dirname "$0")/.."

variant=${1:-default}
PODMAN=${KUBEKMS_PODMAN:-podman}
VERSION=${VERSION:-$(git describe --tags --always --dirty 2>/dev/null || echo dev)}
IMAGE=${IMAGE:-localhost/kubekms:$VERSION}
bases=${KUBEKMS_IMAGE_BASES:-auto}

hack/install-podman.sh >&2

# The Containerfile's own defaults, read from it (one place to change them).
default_arg() { sed -nE "s/^ARG $1=(.*)/\1/p" Containerfile; }
go_image=${GO_IMAGE:-$(default_arg GO_IMAGE)}
runtime_image=${RUNTIME_IMAGE:-$(default_arg RUNTIME_IMAGE)}
static_image=${STATIC_RUNTIME_IMAGE:-gcr.io/distroless/static-debian13:nonroot}
cgo=1
if [[ $variant == static ]]; then
  cgo=0 IMAGE=$IMAGE-static runtime_image=$static_image
fi

reachable() { # IMAGE...: present, or pulled now
  local img
  for img; do
    "$PODMAN" image exists "$img" || timeout 300 "$PODMAN" pull -q "$img" >/dev/null 2>&1 || return 1
  done
}

build_args=()
if [[ $bases == local ]] || { [[ $bases == auto ]] && [[ -z ${GO_IMAGE:-}${RUNTIME_IMAGE:-} ]] && ! reachable "$go_image" "$runtime_image"; }; then
  echo "image: no registry reachable (or KUBEKMS_IMAGE_BASES=local): local base images from hack/image-bases.sh" >&2
  declare -A local_bases
  while IFS='=' read -r k v; do local_bases[$k]=$v; done < <(hack/image-bases.sh)
  go_image=${local_bases[GO_IMAGE]}
  runtime_image=${local_bases[RUNTIME_IMAGE]}
  [[ $variant == static ]] && runtime_image=${local_bases[STATIC_RUNTIME_IMAGE]}
  # The local builder's `go mod download` reaches the module proxy as this host does.
  # and, to save the downloads and compiles, gets this host's module cache and a
  # build cache of its own (build-time mounts: nothing of them is in the image).
  # Fill that cache on the host first: the builder then finds every module there and
  # needs no network of its own (its CA bundle is Debian's, which may not trust a proxy
  # this host trusts; a partly filled cache made it fetch, and fail).
  go mod download
  mkdir -p "${KUBEKMS_CACHE:-$HOME/.cache/kubekms}/image-go-build"
  build_args+=(--network host -v "$(go env GOMODCACHE):/go/pkg/mod"
    -v "${KUBEKMS_CACHE:-$HOME/.cache/kubekms}/image-go-build:/root/.cache/go-build")
fi

echo "image: building $IMAGE (GO_IMAGE=$go_image RUNTIME_IMAGE=$runtime_image CGO_ENABLED=$cgo)" >&2
"$PODMAN" build -f Containerfile "${build_args[@]}" \
  --build-arg GO_IMAGE="$go_image" --build-arg RUNTIME_IMAGE="$runtime_image" \
  --build-arg CGO_ENABLED="$cgo" --build-arg VERSION="$VERSION" \
  --label org.opencontainers.image.version="$VERSION" \
  -t "$IMAGE" . >&2
echo "$IMAGE"
