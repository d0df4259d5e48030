#!/usr/bin/env bash
# Build a Python 3.11 bookworm base image from Debian packages, for machines that cannot pull the
# digest-pinned python:3.11.15-slim-bookworm (no container registry reachable). `make base-image-local`
# runs it; `make images PYTHON_IMAGE=<the tag it prints>` then builds on it.
#
#   images/local/build-base.sh TAG [MIRROR]
#
# debootstrap --variant=minbase (the Priority: required packages: dpkg, apt, passwd, ...) plus
# python3 (= python3.11 in bookworm) and python3-venv, then `docker import`. Needs root, debootstrap
# and a Docker engine. The image has python3 on PATH, as the Dockerfiles expect, no apt lists and no
# caches; apt inside it fetches from MIRROR (default: deb.debian.org over http, signed by Debian's key).
set -euo pipefail
tag=${1:?usage: build-base.sh TAG [MIRROR]}
mirror=${2:-http://deb.debian.org/debian}
docker=${DOCKER:-docker}
[ "$(id -u)" = 0 ] || { echo "build-base.sh: debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "build-base.sh: debootstrap not found: apt-get install debootstrap" >&2; exit 1; }
root=$(mktemp -d /tmp/digilut-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv bookworm "$root" "$mirror"
# What Debian's own docker images do: no lists or archives in the image, a security source beside the
# release, and no daemons started by maintainer scripts inside a build.
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log "$root"/tmp/* "$root"/root/.cache
security=${mirror%/debian}/debian-security
printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s bookworm-security main\n' \
  "$mirror" "$mirror" "$security" > "$root/etc/apt/sources.list"
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d" && chmod +x "$root/usr/sbin/policy-rc.d"
tar -C "$root" --numeric-owner -c . | "$docker" import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  --message "debootstrap --variant=minbase bookworm + python3 python3-venv ($mirror)" - "$tag"
"$docker" run --rm "$tag" python3 -c "import sys, venv, ensurepip; print('python', sys.version.split()[0], sys.executable)"
echo "build-base.sh: built $tag"
