// Runs the TypeScript SDK's example server (simpleStreamableHttp.js) over https on 127.0.0.1 only, with
// a certificate and key from files (a test CA's, made by trustme).
//
// Usage: node ts_https_server.mjs PORT CERT_FILE KEY_FILE
// Env:   INTEROP_NODE_MODULES = the node_modules directory holding @modelcontextprotocol/sdk.
//
// The example calls `app.listen(PORT)`, which makes a plain http server on every interface. This
// launcher makes Node's http.createServer give an https server with the certificate instead, pins any
// numeric listen() to 127.0.0.1, and then loads the example unchanged.
import { readFileSync } from "node:fs";
import http from "node:http";
import https from "node:https";
import net from "node:net";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.env.INTEROP_NODE_MODULES;
const [port, certFile, keyFile] = process.argv.slice(2);
if (!modules || !port || !certFile || !keyFile) {
  console.error("usage: INTEROP_NODE_MODULES=DIR node ts_https_server.mjs PORT CERT_FILE KEY_FILE");
  process.exit(2);
}

const tls = { cert: readFileSync(certFile), key: readFileSync(keyFile) };
http.createServer = (...args) => https.createServer(tls, ...args.filter((arg) => typeof arg === "function"));

const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === "number" || (typeof args[0] === "string" && /^\d+$/.test(args[0]))) {
    const callback = args.find((arg) => typeof arg === "function");
    return callback === undefined
      ? listen.call(this, Number(args[0]), "127.0.0.1")
      : listen.call(this, Number(args[0]), "127.0.0.1", callback);
  }
  return listen.apply(this, args);
};

process.env.MCP_PORT = port;
process.argv = [process.argv[0], process.argv[1]];
await import(
  pathToFileURL(join(modules, "@modelcontextprotocol/sdk/dist/esm/examples/server/simpleStreamableHttp.js")).href
);
