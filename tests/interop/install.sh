#!/usr/bin/env bash
# Install the interop suite's pinned npm packages (tests/interop/package-lock.json) into
# .cache/interop/node_modules with `npm ci`: never globally, and skipped when the lockfile is unchanged
# since the last install in this checkout. npm's own download cache makes a reinstall cheap.
set -euo pipefail
cd "$(dirname "$0")/../.."

here=tests/interop
dest=.cache/interop
stamp="$dest/.installed-lock.sha256"
want="$(sha256sum "$here/package-lock.json" | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -d "$dest/node_modules" ]; then
    echo "interop npm packages up to date in $dest"
    exit 0
fi
mkdir -p "$dest"
cp "$here/package.json" "$here/package-lock.json" "$dest/"
rm -f "$stamp"
npm ci --prefix "$dest" --prefer-offline --no-audit --no-fund --loglevel=error
echo "$want" >"$stamp"
echo "interop npm packages installed in $dest"
