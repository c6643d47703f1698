#!/usr/bin/env bash
# Re-fetches the vendored uPlot from the npm registry and checks it against static/vendor/uplot/SOURCE, so
# the committed copy can be reproduced. Not run at install: the files are committed, the dashboard is offline.
# Usage: vendor.sh          fetch, check the tarball's sha256, copy the files over the vendored ones
#        vendor.sh --check  fetch and check, then compare with the vendored files without writing
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
dest="$here/static/vendor/uplot"
field() { sed -n "s/^$1: //p" "$dest/SOURCE"; }
name="$(field package)"
version="$(field version)"
sha256="$(field sha256)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$name@$version" >/dev/null)
tarball="$work/$name-$version.tgz"
echo "$sha256  $tarball" | sha256sum --check --quiet
tar -xzf "$tarball" -C "$work"

files=(dist/uPlot.iife.min.js dist/uPlot.min.css LICENSE)
if [[ "${1:-}" == "--check" ]]; then
    for f in "${files[@]}"; do
        cmp "$work/package/$f" "$dest/$(basename "$f")"
    done
    echo "vendored $name $version matches the registry's tarball"
else
    for f in "${files[@]}"; do
        cp "$work/package/$f" "$dest/$(basename "$f")"
    done
    echo "vendored $name $version into $dest"
fi
