#!/usr/bin/env bash
# Makes the Containerfile's base images locally, for machines that reach no
# container registry (this project's: only Debian's and Go's package
# servers). Prints the build args that point the UNCHANGED Containerfile at
# them, one per line:
#   GO_IMAGE=localhost/kubekms-builder:...      Debian bookworm minbase + gcc + this host's Go
#   RUNTIME_IMAGE=localhost/kubekms-base:...    glibc + CA certificates + passwd (like distroless/base)
#   STATIC_RUNTIME_IMAGE=localhost/kubekms-static:...  CA certificates + passwd (like distroless/static)
# Builder and runtime are the same Debian release (bookworm, the host's), as
# the Containerfile's header asks: the cgo binary needs the glibc it linked.
#
# The Debian rootfs (mmdebstrap) is cached as a tarball in
# $KUBEKMS_CACHE/images (made once, ~1 min); the images are made from it when
# podman lacks them (~30 s). Versioned: change BASES_VERSION when what goes
# into an image changes. The tarball is not refreshed by itself: for newer
# Debian security updates, delete it and the localhost/kubekms-{builder,base,
# static} images.
set -euo pipefail

BASES_VERSION=2
SUITE=bookworm
PODMAN=${KUBEKMS_PODMAN:-podman}
CACHE=${KUBEKMS_CACHE:-$HOME/.cache/kubekms}/images
GOROOT=$(go env GOROOT)
GOVERSION=$(go env GOVERSION)
arch=$(dpkg --print-architecture)

builder=localhost/kubekms-builder:$GOVERSION-$SUITE-v$BASES_VERSION
base=localhost/kubekms-base:$SUITE-v$BASES_VERSION
static=localhost/kubekms-static:$SUITE-v$BASES_VERSION
rootfs_tar=$CACHE/$SUITE-minbase-$arch-v$BASES_VERSION.tar

log() { echo "image-bases: $*" >&2; }

# Scratch folders under $CACHE, removed however the script ends.
scratch=()
trap 'rm -rf "${scratch[@]}"' EXIT
scratch_dir() { mktemp -d "$CACHE/$1.XXXXXX"; }

have() { "$PODMAN" image exists "$1"; }

# debian_uri KIND: the Debian archive ("debian") or security archive
# ("debian-security") that apt uses on this host, so that a machine that
# reaches only its own mirror works; deb.debian.org otherwise.
debian_uri() {
  local m
  m=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources |
    sed -E 's/^URIs: *//; s/^deb +(\[[^]]*\] +)?//' | awk '{print $1}' | grep -m1 -E "/$1/?\$" || true)
  echo "${m:-http://deb.debian.org/$1}"
}

# make_rootfs: Debian $SUITE minbase with gcc, libc6-dev and CA certificates,
# with the suite's security and stable updates, as a tarball. mmdebstrap (not
# debootstrap): apt resolves and downloads in parallel, measured 46 s here
# against debootstrap's 164 s for the same packages, it writes the tarball
# itself, and it runs without root too (unshare mode). The merged-usr hook
# gives bookworm's merged /usr without the usrmerge package (and perl).
# Documentation is left out (dpkg path-exclude), copyright files kept.
make_rootfs() {
  [[ -s $rootfs_tar ]] && return
  command -v mmdebstrap >/dev/null || { log "needs mmdebstrap: hack/install-podman.sh installs it"; exit 1; }
  mkdir -p "$CACHE"
  local dir start=$SECONDS main security
  dir=$(scratch_dir rootfs) && scratch+=("$dir")
  main=$(debian_uri debian) security=$(debian_uri debian-security)
  log "mmdebstrap --variant=minbase $SUITE from $main and $security (gcc, libc6-dev, ca-certificates)"
  mmdebstrap --quiet --variant=minbase --format=tar \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --include=gcc,libc6-dev,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    "$SUITE" "$dir/rootfs.tar" \
    "deb $main $SUITE main" "deb $main $SUITE-updates main" "deb $security $SUITE-security main" \
    >"$dir/mmdebstrap.log" 2>&1 || { tail -20 "$dir/mmdebstrap.log" >&2; exit 1; }
  mv "$dir/rootfs.tar" "$rootfs_tar"
  log "rootfs cached: $rootfs_tar ($(du -h "$rootfs_tar" | cut -f1), $((SECONDS - start)) s)"
}

# runtime_tree DIR WITH_LIBC: a distroless-like tree from the rootfs: the C
# library (when asked), CA certificates, os-release, a passwd with nonroot
# (65532), /tmp. No shell, no package manager.
runtime_tree() {
  local out=$1 libc=$2 src
  src=$(scratch_dir src) && scratch+=("$src")
  tar -C "$src" -xf "$rootfs_tar"
  mkdir -p "$out"/{etc/ssl/certs,tmp,home/nonroot,usr/lib}
  chmod 1777 "$out/tmp"
  cp -a "$src/etc/ssl/certs/ca-certificates.crt" "$out/etc/ssl/certs/"
  cp -aL "$src/etc/os-release" "$out/usr/lib/os-release"
  ln -s ../usr/lib/os-release "$out/etc/os-release"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$out/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' >"$out/etc/group"
  printf 'hosts: files dns\n' >"$out/etc/nsswitch.conf"
  chown 65532:65532 "$out/home/nonroot" && chmod 0700 "$out/home/nonroot"
  if [[ $libc == yes ]]; then
    # The files of Debian's libc6 package (as distroless/base has them), with the
    # usrmerge links (/lib -> usr/lib, ...) the loader's path needs.
    local l
    for l in lib lib64 bin sbin; do
      [[ -L $src/$l ]] || continue
      cp -a "$src/$l" "$out/$l" && mkdir -p "$out/$(readlink "$src/$l")"
    done
    local f
    while read -r f; do
      [[ -e $src$f || -L $src$f ]] || continue
      [[ -e $out$f || -L $out$f ]] && continue
      [[ -d $src$f && ! -L $src$f ]] && { mkdir -p "$out$f"; continue; }
      mkdir -p "$out$(dirname "$f")"
      cp -a "$src$f" "$out$f"
    done < <(cat "$src"/var/lib/dpkg/info/libc6:"$arch".list "$src"/var/lib/dpkg/info/libgcc-s1:"$arch".list 2>/dev/null | grep -vE '^/usr/share/(doc|lintian|locale)')
  fi
  rm -rf "$src"
}

import_tree() { # DIR IMAGE
  tar -C "$1" --numeric-owner -c . | "$PODMAN" import --quiet \
    --change 'USER 65532:65532' --change 'WORKDIR /' \
    --change "LABEL org.opencontainers.image.description=kubekms local base, made by hack/image-bases.sh from Debian $SUITE" \
    - "$2" >/dev/null
  log "made $2"
}

if ! have "$base" || ! have "$static" || ! have "$builder"; then
  make_rootfs
fi
for spec in "$base yes" "$static no"; do
  read -r img libc <<<"$spec"
  have "$img" && continue
  tree=$(scratch_dir tree) && scratch+=("$tree")
  runtime_tree "$tree" "$libc"
  import_tree "$tree" "$img"
  rm -rf "$tree"
done

if ! have "$builder"; then
  rootimg=localhost/kubekms-bookworm-minbase:v$BASES_VERSION
  have "$rootimg" || "$PODMAN" import --quiet --change 'CMD ["/bin/bash"]' "$rootfs_tar" "$rootimg" >/dev/null
  # The host's Go, copied into the image (a build context of GOROOT).
  printf 'FROM %s\nCOPY . /usr/local/go\nENV PATH=/go/bin:/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin GOPATH=/go GOTOOLCHAIN=local\nWORKDIR /go\n' "$rootimg" |
    "$PODMAN" build --quiet -f - -t "$builder" "$GOROOT" >/dev/null
  "$PODMAN" rmi "$rootimg" >/dev/null
  log "made $builder ($GOVERSION from $GOROOT)"
fi

echo "GO_IMAGE=$builder"
echo "RUNTIME_IMAGE=$base"
echo "STATIC_RUNTIME_IMAGE=$static"
