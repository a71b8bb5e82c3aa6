// panva's oidc-provider (a certified OpenID Connect server) configured as the authorization server of
// one MCP server, on 127.0.0.1 only.
//
// Usage: node oidc_provider.mjs PORT RESOURCE [--token-lifetime S]
// Env:   INTEROP_NODE_MODULES = the node_modules directory holding oidc-provider.
//
// The issuer is http://127.0.0.1:PORT. What it does is what an MCP authorization server does:
// - dynamic client registration (RFC 7591), open to anyone;
// - PKCE with S256 required of every client;
// - resource indicators (RFC 8707): RESOURCE (the MCP server's URL) is the only resource it issues
//   tokens for, and its access tokens are JWTs whose audience is RESOURCE, with scope "mcp";
// - refresh tokens (only with offline_access, which OpenID Connect grants only with prompt=consent),
//   rotated at every use; revocation (RFC 7009); RFC 9207 `iss` on authorization responses;
// - the device authorization grant (RFC 8628), polled every second;
// - short access-token lifetimes (--token-lifetime, default 2 s).
// Its login and consent pages are the library's development pages (any login name and password),
// completed by the tests with plain HTTP form posts. Tokens live in memory: a restart forgets them.
//
// Test-only endpoint: GET /test/stats, what it counted since start (authorizations, token grants by
// type, revocations, the resources tokens were issued for).
import http from "node:http";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.env.INTEROP_NODE_MODULES;
const [port, resource, ...flags] = process.argv.slice(2);
if (!modules || !port || !resource) {
  console.error("usage: INTEROP_NODE_MODULES=DIR node oidc_provider.mjs PORT RESOURCE [--token-lifetime S]");
  process.exit(2);
}
const option = (name, fallback) => {
  const at = flags.indexOf(name);
  return at >= 0 ? flags[at + 1] : fallback;
};
const tokenLifetime = Number(option("--token-lifetime", "2"));

const load = (path) => import(pathToFileURL(join(modules, path)).href);
const { default: Provider, errors } = await load("oidc-provider/lib/index.js");
const jose = await load("jose/dist/webapi/index.js");

const { privateKey } = await jose.generateKeyPair("RS256", { extractable: true });
const signingKey = { ...(await jose.exportJWK(privateKey)), kid: "test-key", alg: "RS256", use: "sig" };

const issuer = `http://127.0.0.1:${port}`;
const stats = {
  authorizations: 0,
  grants: {},
  revocations: 0,
  device_authorizations: 0,
  token_audiences: [],
  authorize_scopes: [],
  authorize_prompts: [],
};

const provider = new Provider(issuer, {
  jwks: { keys: [signingKey] },
  // Random cookie keys per run: nothing outlives the process anyway.
  cookies: { keys: [crypto.randomUUID()] },
  // "mcp" is listed (scopes_supported) so that clients may register for it (RFC 7591 scope).
  scopes: ["openid", "offline_access", "mcp"],
  claims: { openid: ["sub"] },
  findAccount: async (_ctx, sub) => ({ accountId: sub, claims: async () => ({ sub }) }),
  pkce: { required: () => true },
  clientDefaults: {
    grant_types: ["authorization_code", "refresh_token"],
    response_types: ["code"],
    token_endpoint_auth_method: "none",
  },
  features: {
    devInteractions: { enabled: true },
    registration: { enabled: true },
    revocation: { enabled: true },
    deviceFlow: { enabled: true },
    resourceIndicators: {
      enabled: true,
      // A request that names no resource gets a token for the MCP server all the same.
      defaultResource: async () => resource,
      useGrantedResource: async () => true,
      getResourceServerInfo: async (_ctx, indicator) => {
        if (indicator !== resource) throw new errors.InvalidTarget();
        return {
          scope: "mcp",
          audience: resource,
          accessTokenTTL: tokenLifetime,
          accessTokenFormat: "jwt",
          jwt: { sign: { alg: "RS256" } },
        };
      },
    },
  },
  rotateRefreshToken: true,
  ttl: {
    AccessToken: tokenLifetime,
    AuthorizationCode: 60,
    DeviceCode: 120,
    Grant: 3600,
    IdToken: 3600,
    Interaction: 600,
    RefreshToken: 3600,
    Session: 3600,
  },
});
// http://127.0.0.1 behind no proxy: cookies without the Secure flag are fine here.
provider.proxy = false;

provider.on("authorization.success", () => {
  stats.authorizations += 1;
});
provider.on("grant.success", (ctx) => {
  const type = ctx.oidc.params.grant_type;
  stats.grants[type] = (stats.grants[type] ?? 0) + 1;
});
provider.on("access_token.issued", (token) => {
  stats.token_audiences.push(token.aud ?? token.resourceServer?.audience ?? null);
});
provider.on("grant.revoked", () => {
  stats.revocations += 1;
});
provider.on("device_authorization.success", (_ctx, body) => {
  stats.device_authorizations += 1;
  // Poll every second (RFC 8628's default is 5 s), so that a device login takes a test seconds.
  body.interval = 1;
});
provider.use(async (ctx, next) => {
  if (ctx.path === "/test/stats" && ctx.method === "GET") {
    // pid: the tests know it is this process that answers on the port, not another one that took it.
    ctx.body = { ...stats, pid: process.pid };
    return;
  }
  if (ctx.path === "/auth") {
    stats.authorize_scopes.push(ctx.query.scope ?? null);
    stats.authorize_prompts.push(ctx.query.prompt ?? null);
  }
  await next();
});

const server = http.createServer(provider.callback());
server.listen(Number(port), "127.0.0.1", () => {
  console.log(`oidc-provider listening on ${issuer}`);
});
for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
