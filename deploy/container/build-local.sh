#!/usr/bin/env bash
# Builds the image with buildah where no image registry can be reached (CI,
# air-gapped hosts) from a binary built beforehand, then checks it runs
# as it should. The runtime base is made from Debian's packages with
# mmdebstrap (once; kept as localhost/nbdferry-debian-minbase:bookworm),
# and the Containerfile's build stage is replaced by BINARY through a
# build context of the same name, so that the runtime stage is the one
# the release builds.
#
# Usage (root): deploy/container/build-local.sh BINARY [TAG]
# Needs: buildah, mmdebstrap (Debian packages).
set -euo pipefail

binary=${1:?usage: build-local.sh BINARY [TAG]}
tag=${2:-localhost/nbdferry:local}
top=$(cd "$(dirname "$0")/../.." && pwd)
base=localhost/nbdferry-debian-minbase:bookworm

# No daemon, no overlay mounts: works inside an unprivileged container.
export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot

work=$(mktemp -d -t nbdferry-image.XXXXXX)
ctr=
cleanup() {
    if [ -n "$ctr" ]; then
        buildah rm "$ctr" >/dev/null 2>&1 || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

if ! buildah inspect --type image "$base" >/dev/null 2>&1; then
    mmdebstrap --quiet --variant=minbase bookworm "$work/rootfs.tar"
    ctr=$(buildah from scratch)
    buildah add "$ctr" "$work/rootfs.tar" / >/dev/null
    buildah commit --quiet --rm "$ctr" "$base" >/dev/null
    ctr=
    rm -f "$work/rootfs.tar"
fi

install -D -m 0755 "$binary" "$work/build/out/usr/bin/nbdferry"
buildah build --quiet --pull=never \
    --build-arg RUNTIME_IMAGE="$base" \
    --build-context build="$work/build" \
    -f "$top/deploy/container/Containerfile" \
    --ignorefile "$top/deploy/container/Containerfile.dockerignore" \
    -t "$tag" "$top" >/dev/null

# The image runs the daemon as 10809, by default with the config path the
# manifests mount, and the binary works in it.
config=$(buildah inspect --type image \
    --format '{{.OCIv1.Config.User}}|{{.OCIv1.Config.Entrypoint}}|{{.OCIv1.Config.Cmd}}' "$tag")
want='10809:10809|[/usr/bin/nbdferry]|[serve --state-dir /var/lib/nbdferry --config /etc/nbdferry/nbdferry.toml]'
[ "$config" = "$want" ] || { echo "image config: $config, want $want" >&2; exit 1; }
ctr=$(buildah from "$tag")
buildah run "$ctr" -- /usr/bin/nbdferry --version
[ "$(buildah run "$ctr" -- id -u)" = 10809 ] || { echo "not running as 10809" >&2; exit 1; }
buildah run "$ctr" -- sh -c 'test -d /var/lib/nbdferry && test -O /var/lib/nbdferry'
echo "image built: $tag"
