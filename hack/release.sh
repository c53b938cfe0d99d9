#!/usr/bin/env bash
# `make release`: the release artifacts in dist/ (override with DIST=):
#   kubekms-$VERSION-linux-{amd64,arm64}          cgo (PKCS#11 support), dynamically linked against glibc
#   kubekms-$VERSION-linux-{amd64,arm64}-static   CGO_ENABLED=0 (no PKCS#11), runs anywhere
#   kubekms-$VERSION-linux-*.cdx.json             CycloneDX SBOM of each binary's module graph, read
#                                                 from the build info Go puts into it (cyclonedx-gomod bin)
#   kubekms-$VERSION-image.oci.tar                the container image (`make image`), an OCI archive
#   SHA256SUMS                                    sha256sum of every file above
# The arm64 cgo build needs a cross compiler: Debian's gcc-aarch64-linux-gnu (installed here as root).
# RELEASE_IMAGE=0 leaves the image out.
set -euo pipefail
cd "$(dirname "$0")/.."

GO=${GO:-go}
VERSION=${VERSION:-$(git describe --tags --always --dirty 2>/dev/null || echo dev)}
DIST=${DIST:-dist}
CYCLONEDX=github.com/CycloneDX/cyclonedx-gomod/cmd/cyclonedx-gomod@v1.10.0
host_arch=$($GO env GOARCH)

cross_cc() { # GOARCH: the C compiler for a cgo build for it
  case $1 in
  "$host_arch") echo "${CC:-gcc}" ;;
  arm64) echo aarch64-linux-gnu-gcc ;;
  amd64) echo x86_64-linux-gnu-gcc ;;
  *) return 1 ;;
  esac
}

need_cross() { # GOARCH: install Debian's cross compiler when missing
  local cc pkg
  cc=$(cross_cc "$1")
  command -v "$cc" >/dev/null && return
  case $1 in
  arm64) pkg="gcc-aarch64-linux-gnu libc6-dev-arm64-cross" ;;
  amd64) pkg="gcc-x86-64-linux-gnu libc6-dev-amd64-cross" ;;
  esac
  if [[ $(id -u) != 0 ]]; then
    echo "release: the cgo build for $1 needs $cc: apt-get install $pkg" >&2
    exit 1
  fi
  echo "release: apt-get install $pkg" >&2
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkg >/dev/null ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkg >/dev/null; }
}

rm -rf "$DIST" && mkdir -p "$DIST"
for arch in amd64 arm64; do
  for cgo in 1 0; do
    name=kubekms-$VERSION-linux-$arch
    env=(GOOS=linux GOARCH="$arch" CGO_ENABLED="$cgo")
    if [[ $cgo == 0 ]]; then
      name+=-static
    else
      need_cross "$arch"
      env+=(CC="$(cross_cc "$arch")")
    fi
    start=$SECONDS
    env "${env[@]}" nice -n 10 "$GO" build -trimpath -ldflags "-s -w -X main.version=$VERSION" -o "$DIST/$name" ./cmd/kubekms
    "$GO" run "$CYCLONEDX" bin -json -std -version "$VERSION" -output "$DIST/$name.cdx.json" "$DIST/$name"
    echo "release: $name ($(du -h "$DIST/$name" | cut -f1), $((SECONDS - start)) s) + SBOM" >&2
  done
done
# The binaries are what they claim: static ones have no ELF interpreter, cgo ones the
# target's glibc loader, and each is for its architecture.
for arch in amd64 arm64; do
  machine=$([[ $arch == amd64 ]] && echo X86-64 || echo AArch64)
  for f in "$DIST/kubekms-$VERSION-linux-$arch" "$DIST/kubekms-$VERSION-linux-$arch-static"; do
    readelf -h "$f" | grep -q "Machine:.*$machine" || { echo "release: $f is not a $machine binary" >&2; exit 1; }
    interp=$(readelf -lW "$f" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
    case $f in
    *-static) [[ -z $interp ]] || { echo "release: $f is not static (interpreter $interp)" >&2; exit 1; } ;;
    *) [[ $interp == /lib* ]] || { echo "release: $f is not a cgo build (no interpreter)" >&2; exit 1; } ;;
    esac
  done
done

if [[ ${RELEASE_IMAGE:-1} != 0 ]]; then
  image=$(IMAGE=${IMAGE:-localhost/kubekms:$VERSION} VERSION=$VERSION hack/image.sh | tail -1)
  "${KUBEKMS_PODMAN:-podman}" save --format oci-archive -o "$DIST/kubekms-$VERSION-image.oci.tar" "$image"
  echo "release: $image -> kubekms-$VERSION-image.oci.tar" >&2
fi

(cd "$DIST" && sha256sum -- * >SHA256SUMS && sha256sum -c --quiet SHA256SUMS)
echo "release: $DIST/SHA256SUMS" >&2
ls -l "$DIST"
