#!/usr/bin/env bash
# Installs podman (Debian's package, with runc, catatonit for pods, and mmdebstrap for the local
# base images of hack/image-bases.sh) and writes the few containers.conf
# settings this host needs, as a drop-in that leaves the rest of podman's
# configuration alone:
#   root:     /etc/containers/containers.conf.d/50-kubekms.conf
#   non-root: ${XDG_CONFIG_HOME:-~/.config}/containers/containers.conf.d/50-kubekms.conf
# Each setting is written only where the host needs it, and says why:
#   runtime = "runc"           cgroups v1 or hybrid: crun refuses them
#   cgroup_manager = cgroupfs  no systemd as PID 1 to manage cgroups
#   events_logger = "file"     no journald
#   default_ulimits            no CAP_SYS_RESOURCE: podman's default nofile
#                              (1048576) is above this process's hard limit
#                              (nproc: at most kernel.pid_max)
# Idempotent: a second run installs nothing and rewrites nothing.
# KUBEKMS_PODMAN names a podman to use instead (then nothing is installed).
set -euo pipefail

if [[ -z "${KUBEKMS_PODMAN:-}" ]]; then
  need=()
  command -v podman >/dev/null || need+=(podman)
  command -v runc >/dev/null || need+=(runc)
  command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
  # pods (kube play) need an infra container: podman builds its pause image from catatonit
  [[ -x /usr/libexec/podman/catatonit || -x /usr/bin/catatonit ]] || need+=(catatonit)
  if ((${#need[@]})); then
    if [[ $(id -u) != 0 ]]; then
      echo "install-podman: missing ${need[*]}; install them as root (apt-get install ${need[*]})" >&2
      exit 1
    fi
    echo "install-podman: apt-get install ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null ||
      { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }
  fi
fi

if [[ $(id -u) == 0 ]]; then
  dir=/etc/containers/containers.conf.d
else
  dir=${XDG_CONFIG_HOME:-$HOME/.config}/containers/containers.conf.d
fi
file=$dir/50-kubekms.conf

containers=() engine=()
cap_eff=$(awk '/^CapEff:/ {print $2}' /proc/self/status)
if (( ((0x$cap_eff >> 24) & 1) == 0 )); then # CAP_SYS_RESOURCE
  nofile=$(ulimit -Hn) nproc=$(ulimit -Hu) pid_max=$(cat /proc/sys/kernel/pid_max)
  [[ $nofile == unlimited ]] && nofile=1048576
  [[ $nproc == unlimited ]] && nproc=1048576
  # Measured on the project's machines: runc fails to set nproc above kernel.pid_max
  # (32768 there) although the hard limit is higher.
  ((nproc > pid_max)) && nproc=$pid_max
  containers+=("# no CAP_SYS_RESOURCE: stay within this host's hard limits"
    "default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]")
fi
if [[ $(stat -fc %T /sys/fs/cgroup) != cgroup2fs ]]; then
  engine+=("# cgroups v1 or hybrid: crun refuses them" 'runtime = "runc"')
fi
if [[ ! -d /run/systemd/system ]]; then
  engine+=("# no systemd as PID 1" 'cgroup_manager = "cgroupfs"')
fi
if [[ ! -S /run/systemd/journal/socket ]]; then
  engine+=("# no journald" 'events_logger = "file"')
fi

want="# Written by kubekms's hack/install-podman.sh for this host; safe to delete."$'\n'
if ((${#containers[@]})); then
  want+=$'[containers]\n'$(printf '%s\n' "${containers[@]}")$'\n'
fi
if ((${#engine[@]})); then
  want+=$'[engine]\n'$(printf '%s\n' "${engine[@]}")$'\n'
fi

if ((${#containers[@]} + ${#engine[@]} == 0)); then
  if [[ -f $file ]]; then rm -f "$file" && echo "install-podman: removed $file (not needed here)"; fi
elif [[ ! -f $file || "$(cat "$file")"$'\n' != "$want" ]]; then
  mkdir -p "$dir"
  printf '%s' "$want" >"$file.tmp" && mv "$file.tmp" "$file"
  echo "install-podman: wrote $file"
fi
"${KUBEKMS_PODMAN:-podman}" --version
