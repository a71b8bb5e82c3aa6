#!/usr/bin/env bash
# Install the official MCP conformance suite, and the TypeScript SDK that everything_server.mjs (the server
# of test_server_scenarios.py) runs on, both pinned in tests/conformance/package-lock.json, into
# .cache/conformance/node_modules with `npm ci`, never globally, then patch the suite's bundle for this machine:
# - it imports globSync from "fs", which Node 20 lacks: that one import comes from the glob package
#   installed beside it;
# - its test servers listen on every interface and name themselves "localhost": they listen on
#   127.0.0.1 (waiting for the bind, which is asynchronous with a host) and say so.
# Skipped when the lockfile and this script are unchanged since the last install in this checkout.
set -euo pipefail
cd "$(dirname "$0")/../.."

here=tests/conformance
dest=.cache/conformance
stamp="$dest/.installed.sha256"
want="$(cat "$here/package-lock.json" "$here/install.sh" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -d "$dest/node_modules" ]; then
    echo "conformance suite up to date in $dest"
    exit 0
fi
mkdir -p "$dest"
cp "$here/package.json" "$here/package-lock.json" "$dest/"
rm -f "$stamp"
# The physical path: npm takes a prefix reached through a symlink for a link to another package.
npm ci --prefix "$(cd "$dest" && pwd -P)" --prefer-offline --no-audit --no-fund --loglevel=error

bundle="$dest/node_modules/@modelcontextprotocol/conformance/dist/index.js"
node - "$bundle" <<'JS'
const fs = require("fs");
const path = process.argv[2];
let text = fs.readFileSync(path, "utf8");
function patch(from, to, count) {
  const found = text.split(from).length - 1;
  if (found !== count) {
    console.error(`conformance patch: expected ${count} of ${JSON.stringify(from)}, found ${found}`);
    process.exit(1);
  }
  text = text.split(from).join(to);
}
patch('globSync as o,', "", 1);
patch('from"fs";', 'from"fs";import{globSync as o}from"glob";', 1);
// Given a host, listen() binds asynchronously: each start() (all async) waits for it.
patch(".listen(0)", '.listen(0,"127.0.0.1"),await new Promise(r=>this.httpServer.once("listening",r))', 3);
patch(".listen(0,()=>", '.listen(0,"127.0.0.1",()=>', 2);
patch("http://localhost:${", "http://127.0.0.1:${", 5);
fs.writeFileSync(path, text);
JS
echo "$want" >"$stamp"
echo "conformance suite installed in $dest"
