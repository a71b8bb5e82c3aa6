"""The client the MCP conformance suite runs for its auth scenarios: the proxy's managed login, end to end.

``npx @modelcontextprotocol/conformance client --command "python tests/conformance/client.py" --scenario
auth/...`` runs ``python tests/conformance/client.py URL`` against the scenario's MCP server. This
writes a config with one upstream (URL, ``auth = "oauth"``, and the pre-registered client of
``MCP_CONFORMANCE_CONTEXT`` when the scenario gives one), runs ``mcp-heal-proxy login --no-browser``,
follows the URL it prints as a browser would, starts ``mcp-heal-proxy serve``, and lists and calls tools
through it with the MCP SDK client, which knows nothing of OAuth. When the proxy answers that the
upstream wants another login (a 403 ``insufficient_scope``), it logs in once more and tries again,
as the error tells a user to.

``--without FEATURE`` switches one rule of the login off (tests/conformance/test_conformance.py shows
that the scenario covering the rule then fails); ``--cli`` is how this file runs the CLI with the rule
switched off.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.managed_login import CLI, child_env, login, serve

UPSTREAM = "conformance"
# Logins after the first one that a "log in again" error may cause: one, as a user would try.
RELOGINS = 1


# The rules --without can switch off (see disable).
FEATURES = frozenset(
    {
        "prm-order",
        "prm-from-challenge",
        "oidc-discovery",
        "path-inserted-as-metadata",
        "challenge-scope",
        "resource-scopes",
        "omit-scope",
        "step-up-scope",
        "offline-access",
        "offline-access-only-when-listed",
        "client-secret-basic",
        "registered-auth-method",
        "resource-check",
        "2025-03-26",
        "static-client",
    }
)


def disable(feature: str) -> None:
    """Switch one rule of the managed login off, in this process."""
    from mcp_heal_proxy.auth import endpoints, errors, rules
    from mcp_heal_proxy.auth import login as login_flow

    choose = rules.choose_scopes
    prm_urls = rules.prm_urls
    as_metadata_urls = rules.as_metadata_urls
    # Where the login looks each rule up: the discovery (scopes included), registration and token requests
    # (endpoints.py), or the flow that picks the token endpoint's authentication (login.py).
    user = {"token_auth_method": login_flow}

    def scopes_without(name: str) -> Any:
        return lambda **kw: choose(**{**kw, name: None})

    async def no_legacy(_http: Any, _url: str) -> dict[str, Any]:
        raise errors.LoginError("no protected-resource metadata")

    def always_basic(form: dict[str, str], client_id: str, secret: str | None, _method: str) -> dict[str, str]:
        form["client_id"] = client_id
        return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret or ''}".encode()).decode()}

    def plus_offline(**kw: Any) -> list[str]:
        scopes = choose(**kw)
        return scopes if rules.OFFLINE_ACCESS in scopes else [*scopes, rules.OFFLINE_ACCESS]

    def no_offline(**kw: Any) -> list[str]:
        return choose(**{**kw, "server_scopes": None})

    def patch(name: str, value: object) -> None:
        setattr(user.get(name, endpoints), name, value)

    if feature == "prm-order":  # only the root metadata URL, as a client ignoring the path would
        patch("prm_urls", lambda url, _hint: [f"{rules.origin_of(url)}/.well-known/oauth-protected-resource"])
    elif feature == "prm-from-challenge":
        patch("prm_urls", lambda url, _hint: prm_urls(url, None))
    elif feature == "oidc-discovery":
        patch("as_metadata_urls", lambda issuer: [u for u in as_metadata_urls(issuer) if "openid" not in u])
    elif feature == "path-inserted-as-metadata":
        patch("as_metadata_urls", lambda issuer: as_metadata_urls(rules.origin_of(issuer)))
    elif feature == "challenge-scope":
        patch("choose_scopes", scopes_without("challenge_scope"))
    elif feature == "resource-scopes":
        patch("choose_scopes", scopes_without("resource_scopes"))
    elif feature == "omit-scope":
        patch("choose_scopes", lambda **kw: choose(**kw) or ["mcp"])
    elif feature == "step-up-scope":
        patch("choose_scopes", scopes_without("wanted"))
    elif feature == "offline-access":
        patch("REGISTRATION_GRANT_TYPES", ("authorization_code",))
        patch("choose_scopes", no_offline)
    elif feature == "offline-access-only-when-listed":
        patch("choose_scopes", plus_offline)
    elif feature == "client-secret-basic":  # a client that knows only client_secret_post
        patch(
            "token_auth_method",
            lambda _registered, _supported, has_secret: "client_secret_post" if has_secret else "none",
        )
    elif feature == "registered-auth-method":  # a client that always uses client_secret_basic
        patch("token_auth_method", lambda _registered, _supported, _has_secret: "client_secret_basic")
        patch("client_auth", always_basic)
    elif feature == "resource-check":
        patch("check_resource", lambda _resource, _url: True)
    elif feature == "2025-03-26":
        patch("legacy_metadata", no_legacy)
    elif feature != "static-client":  # that one is left out of the config instead (see write_config)
        raise SystemExit(f"unknown feature {feature}")


def write_config(directory: Path, url: str, without: str | None) -> Path:
    context = json.loads(os.environ.get("MCP_CONFORMANCE_CONTEXT") or "{}")
    lines = [f"[upstreams.{UPSTREAM}]", f"url = {json.dumps(url)}", 'path = "/mcp"', 'auth = "oauth"']
    if context.get("client_id") and without != "static-client":
        lines.append(f"client_id = {json.dumps(context['client_id'])}")
        if context.get("client_secret"):
            lines.append(f"client_secret = {json.dumps(context['client_secret'])}")
    config = directory / "proxy.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


async def call_tools(url: str) -> None:
    """What a client without OAuth does through the proxy: initialize, list the tools, call the first."""
    from mcp.client.session import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async with streamable_http_client(url) as (read, write, *_), ClientSession(read, write) as session:
        await session.initialize()
        tools = await session.list_tools()
        if tools.tools:
            result = await session.call_tool(tools.tools[0].name, {})
            if result.is_error:
                raise RuntimeError(f"tool call failed: {result.content}")
        print(f"listed {len(tools.tools)} tools and called {tools.tools[0].name if tools.tools else 'none'}")


def wants_login(exc: BaseException) -> bool:
    """Whether the proxy's error says to log in (the SDK nests it in task groups)."""
    if isinstance(exc, BaseExceptionGroup):
        return any(wants_login(inner) for inner in exc.exceptions)
    return "mcp-heal-proxy login" in str(exc)


async def run(url: str, without: str | None) -> int:
    command = (sys.executable, __file__, "--cli", "--without", without) if without else CLI
    with tempfile.TemporaryDirectory(prefix="mcp-heal-proxy-conformance-") as temp:
        directory = Path(temp)
        env = child_env(directory / "state")
        config = write_config(directory, url, without)
        # The proxy starts while the login runs (it reads the tokens when they come), and the SDK
        # client is imported meanwhile: the scenario has 30 s for all of it.
        importing = asyncio.get_running_loop().run_in_executor(None, import_client)
        starting = asyncio.get_running_loop().create_task(
            serve(config, env, "--state", ":memory:", "--log-format", "json")
        )
        try:
            for attempt in range(1 + RELOGINS):
                result = await login(config, UPSTREAM, env, command=command)
                sys.stdout.write(result.stdout)
                sys.stderr.write(result.stderr)
                if result.returncode != 0:
                    print(f"login exited with {result.returncode}", file=sys.stderr)
                    return 1
                proxy = await starting
                await importing
                try:
                    await call_tools(proxy.url)
                    return 0
                except Exception as exc:  # the SDK raises its own and anyio's errors
                    print(f"calling through the proxy failed: {exc!r}", file=sys.stderr)
                    if not wants_login(exc) or attempt == RELOGINS:
                        return 1
            return 1
        finally:
            proxy = await starting
            sys.stderr.write(await proxy.stop())


def import_client() -> None:
    import mcp.client.session
    import mcp.client.streamable_http  # noqa: F401


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--without", default=None)
    parser.add_argument("--cli", action="store_true", help="run the mcp-heal-proxy CLI with the rule switched off")
    args, rest = parser.parse_known_args()
    if args.without is not None and args.without not in FEATURES:
        parser.error(f"unknown feature {args.without}")
    if args.cli:
        if args.without:
            disable(args.without)
        from mcp_heal_proxy.cli import main as cli_main

        cli_main(rest)
    if len(rest) != 1:
        parser.error("give the MCP server URL")
    return asyncio.run(run(rest[0], args.without))


if __name__ == "__main__":
    sys.exit(main())
