#!/usr/bin/env bash
# Re-fetches the dashboard's charting library (uPlot, from the npm registry) and checks it:
# the tarball against the registry's pinned sha512 integrity, the vendored files in
# aggregator/assets/uplot/ against SHA256SUMS. `--update` copies the fetched files over the
# vendored ones (after the integrity check) and rewrites SHA256SUMS.
set -euo pipefail
cd "$(dirname "$0")/../.."
version=1.6.32
integrity='sha512-KIMVnG68zvu5XXUbC4LQEPnhwOxBuLyW1AHtpm6IKTXImkbLgkMy+jabjLgSLMasNuGGzQm/ep3tOkyTxpiQIw=='
dest=aggregator/assets/uplot
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
tgz=$(cd "$tmp" && npm pack --silent "uplot@$version")
got="sha512-$(openssl dgst -sha512 -binary "$tmp/$tgz" | base64 -w0)"
[ "$got" = "$integrity" ] || { echo "vendor-uplot: $tgz integrity $got, expected $integrity" >&2; exit 1; }
tar -xzf "$tmp/$tgz" -C "$tmp"
if [ "${1:-}" = --update ]; then
  cp "$tmp/package/dist/uPlot.iife.min.js" "$tmp/package/dist/uPlot.min.css" "$tmp/package/LICENSE" "$dest/"
  (cd "$dest" && sha256sum uPlot.iife.min.js uPlot.min.css LICENSE > SHA256SUMS)
fi
for f in uPlot.iife.min.js uPlot.min.css LICENSE; do
  src=$tmp/package/$([ "$f" = LICENSE ] || echo dist/)$f
  cmp -s "$src" "$dest/$f" || { echo "vendor-uplot: $dest/$f differs from uplot@$version" >&2; exit 1; }
done
(cd "$dest" && sha256sum -c --quiet SHA256SUMS)
echo "vendor-uplot: $dest matches uplot@$version ($integrity)"
