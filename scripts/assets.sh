#!/usr/bin/env bash
# The dashboard's JavaScript and CSS (kiln/api/dashboard/static/vendor/), fetched with
# `npm pack` from the npm registry at pinned versions and checked against their
# integrity hashes. Served by Kiln itself: a Kiln host may have no internet at run time.
set -euo pipefail
cd "$(dirname "$0")/.."

VENDOR=kiln/api/dashboard/static/vendor
# package@version  sha512 integrity (as `npm pack --json` prints it)  files to keep (from package/)
ASSETS=(
  "htmx.org@2.0.4 sha512-HLxMCdfXDOJirs3vBZl/ZLoY+c7PfM4Ahr2Ad4YXh6d22T5ltbTXFFkpx9Tgb2vvmWFMbIc3LqN2ToNkZJvyYQ== dist/htmx.min.js"
  "@xterm/xterm@5.5.0 sha512-hqJHYaQb5OptNunnyAnkHyM8aCjZ1MEIDTQu1iIbbTD/xops91NB5yq1ZK/dC2JDbVWtF23zUtl9JE2NqwT87A== lib/xterm.js,css/xterm.css"
  "@xterm/addon-fit@0.10.0 sha512-UFYkDm4HUahf2lnEyHvio51TNGiLK66mqP2JoATy7hRZeXaGMRDr00JiSF7m63vR5WKATF605yEggJKsw0JpMQ== lib/addon-fit.js"
)

stamp=$VENDOR/.versions
wanted=$(printf '%s\n' "${ASSETS[@]}")
if [[ -f $stamp && "$(cat "$stamp")" == "$wanted" ]]; then
  exit 0
fi
if ! command -v npm >/dev/null; then
  echo "assets: npm is missing (Debian: apt-get install npm)" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$VENDOR"
for entry in "${ASSETS[@]}"; do
  read -r spec integrity files <<<"$entry"
  echo "assets: $spec"
  tarball=$(cd "$work" && npm pack --silent "$spec")
  actual="sha512-$(openssl dgst -sha512 -binary "$work/$tarball" | base64 -w0)"
  if [[ $actual != "$integrity" ]]; then
    echo "assets: $spec does not match its pinned integrity ($actual)" >&2
    exit 1
  fi
  IFS=, read -ra keep <<<"$files"
  for file in "${keep[@]}"; do
    tar -xzf "$work/$tarball" -C "$work" "package/$file"
    cp "$work/package/$file" "$VENDOR/$(basename "$file")"
  done
  rm -rf "$work/package"
done
printf '%s\n' "${ASSETS[@]}" >"$stamp"
