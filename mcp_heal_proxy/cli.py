"""Command line: ``mcp-heal-proxy serve ...``. The only module that exits the process."""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, NoReturn

import structlog
from aiohttp import web

from mcp_heal_proxy import __version__
from mcp_heal_proxy.app import build_app
from mcp_heal_proxy.config import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    LOG_FORMATS,
    LOG_LEVELS,
    ConfigError,
    ProxyConfig,
    build_config,
    check_url,
    describe,
    mask_url,
)
from mcp_heal_proxy.errors import ProxyError
from mcp_heal_proxy.observability import configure_logging

EXIT_USAGE = 2

SERVE_EXAMPLES = """\
examples:
  mcp-heal-proxy serve --upstream https://mcp.example.com/mcp
  mcp-heal-proxy serve --upstream http://127.0.0.1:8000/mcp --port 9000 --state :memory:
  mcp-heal-proxy serve --config proxy.toml          # several upstreams, headers, timeouts
  MCP_HEAL_PROXY_UPSTREAM=https://mcp.example.com/mcp mcp-heal-proxy serve

settings come from the config file, then MCP_HEAL_PROXY_* variables (HOST, PORT, STATE, UPSTREAM,
CONFIG, TOKEN, LOG_FORMAT, LOG_LEVEL, MAX_BODY_BYTES), then flags; later ones win.

then point the client at the proxy, e.g. in ~/.codex/config.toml:
  [mcp_servers.example]
  url = "http://127.0.0.1:8787/mcp"
"""

DEMO_EXAMPLES = """\
examples:
  mcp-heal-proxy demo             # about 3 seconds: a call, 2.5 s idle, a healed call
  mcp-heal-proxy demo --verbose   # also show the proxy's own log events (session.healed)

Everything runs in this process on free 127.0.0.1 ports; no server of your own is needed.
Exit status 0 when the proxy healed the expired session, 1 when it did not.
"""


CHECK_EXAMPLES = """\
examples:
  mcp-heal-proxy check-config proxy.toml
  GITHUB_TOKEN=... mcp-heal-proxy check-config proxy.toml

exit status 0 when the file is valid, 2 with a one-line reason when it is not.
"""


LOGIN_EXAMPLES = """\
examples:
  mcp-heal-proxy login github --config proxy.toml                 # opens a browser
  mcp-heal-proxy login github --config proxy.toml --no-browser    # prints the URL to open

for an upstream with auth = "oauth" in the config file:
  [upstreams.github]
  url = "https://api.githubcopilot.com/mcp/"
  auth = "oauth"

exit status 0 once the tokens are stored, 1 when the login failed, 2 for a config mistake.
"""


class UsageError(Exception):
    """A user mistake: reported in one line, exit status 2, no traceback."""


def _upstream_url(value: str) -> str:
    try:
        return check_url(value, "--upstream")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {port}")
    return port


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with examples in each subcommand's help."""
    parser = argparse.ArgumentParser(
        prog="mcp-heal-proxy",
        description="Local proxy that keeps MCP Streamable HTTP sessions alive when the server forgets them.",
        epilog=SERVE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mcp-heal-proxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the proxy in front of one upstream MCP server",
        description="Run the proxy. Clients connect to http://HOST:PORT/mcp.",
        epilog=SERVE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--upstream", type=_upstream_url, metavar="URL", help="upstream MCP endpoint, served at /mcp")
    serve.add_argument("--config", metavar="FILE", help="TOML config file (see config.example.toml)")
    serve.add_argument("--host", help=f"address to listen on (default {DEFAULT_HOST})")
    serve.add_argument("--port", type=_port, help=f"port to listen on, 0 for any (default {DEFAULT_PORT})")
    serve.add_argument(
        "--state",
        metavar="PATH",
        help="session store: a SQLite file, :memory:, or redis://HOST:PORT/DB (default: a file in the user's state directory)",
    )
    serve.add_argument("--log-format", choices=LOG_FORMATS, help="log format (default auto: console on a terminal)")
    serve.add_argument("--log-level", choices=LOG_LEVELS, help="log level (default info)")
    check = commands.add_parser(
        "check-config",
        help="validate a config file and print the effective config, secrets masked",
        description="Validate a config file (with MCP_HEAL_PROXY_* variables applied) and print the result.",
        epilog=CHECK_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("file", metavar="FILE", help="TOML config file")
    demo = commands.add_parser(
        "demo",
        help="watch the proxy heal an expired session (built-in server and client)",
        description="Start a built-in MCP server whose sessions expire after 2 s idle, the proxy in front of it, "
        "and a scripted client that calls a tool, waits past the expiry, and calls again.",
        epilog=DEMO_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--verbose", action="store_true", help="print the proxy's log events to stderr")
    login = commands.add_parser(
        "login",
        help='log in to an upstream with auth = "oauth"; serve then sends its tokens',
        description="Log in to the upstream's authorization server (OAuth code flow with PKCE) and store "
        "the tokens beside the session store; serve refreshes them and sends them upstream.",
        epilog=LOGIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    logout = commands.add_parser("logout", help="forget the tokens of an upstream's login")
    for command in (login, logout):
        command.add_argument("name", metavar="NAME", help="the upstream's name ([upstreams.NAME])")
        command.add_argument("--config", metavar="FILE", help="TOML config file")
        command.add_argument("--state", metavar="PATH", help="the session store, as given to serve")
    login.add_argument("--no-browser", action="store_true", help="print the URL to open instead of opening it")
    return parser


def _run(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop where it exists (not on Windows)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    result: int = uvloop.run(coro)
    return result


async def serve(config: ProxyConfig) -> int:
    """Serve until SIGINT or SIGTERM; return the exit status."""
    log = structlog.get_logger("mcp_heal_proxy")
    # shutdown_timeout: after SIGTERM the listener closes at once (new requests are refused) and open
    # streams get this long to finish before their handlers are cancelled.
    runner = web.AppRunner(
        build_app(config), handler_cancellation=True, access_log=None, shutdown_timeout=config.shutdown_grace
    )
    try:
        await runner.setup()
    except ProxyError as exc:
        # The store could not be opened (an unwritable path, Redis not answering): the user's to fix.
        raise UsageError(f"cannot open the session store {config.state_display}: {exc.message}") from None
    site = web.TCPSite(runner, config.host, config.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise UsageError(f"cannot listen on {config.host}:{config.port}: {reason}") from None
    # Handlers go in before the banner: a supervisor may signal as soon as it reads the URL.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    # With --port 0 the system picked a free port: report the real one.
    port = runner.addresses[0][1] if runner.addresses else config.port
    print(f"mcp-heal-proxy {__version__} on {config.host}:{port}, sessions in {config.state_display}", flush=True)
    for upstream in config.upstreams:
        url = config.client_url(upstream, port)
        print(f"  {upstream.name}: {url} -> {upstream.url}", flush=True)
        print(f'  paste into your MCP client: url = "{url}"', flush=True)
        log.info(
            "proxy.started",
            upstream=upstream.name,
            url=url,
            upstream_url=mask_url(upstream.url),
            state=config.state_display,
        )
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.token:
        log.warning(
            "proxy.exposed_without_token",
            host=config.host,
            hint="anyone who can reach this address can use the upstreams; set [server] token",
        )
    try:
        await stop.wait()
    finally:
        log.info("proxy.stopping")
        await runner.cleanup()
    return 0


def _login_or_logout(args: argparse.Namespace) -> int:
    from mcp_heal_proxy.auth.managed import LoginError, run_login, run_logout

    config = build_config(config_file=args.config, flags={"state": args.state})
    configure_logging(config.log_format, "warning", config.secrets())
    try:
        if args.command == "logout":
            return run_logout(config, args.name, out=sys.stdout)
        return _run(run_login(config, args.name, out=sys.stdout, open_browser=not args.no_browser))
    except LoginError as exc:
        print(f"mcp-heal-proxy: login failed: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of the ``mcp-heal-proxy`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from mcp_heal_proxy.demo import run_demo

        configure_logging("auto", "info" if args.verbose else "warning")
        sys.exit(_run(run_demo(sys.stdout)))
    try:
        if args.command in ("login", "logout"):
            sys.exit(_login_or_logout(args))
        if args.command == "check-config":
            config = build_config(config_file=args.file, flags={})
            print(json.dumps(describe(config), indent=2, default=list))
            sys.exit(0)
        flags = {
            "upstream": args.upstream,
            "host": args.host,
            "port": args.port,
            "state": args.state,
            "log_format": args.log_format,
            "log_level": args.log_level,
        }
        config = build_config(config_file=args.config, flags=flags)
        configure_logging(config.log_format, config.log_level, config.secrets())
        sys.exit(_run(serve(config)))
    except (UsageError, ConfigError) as exc:
        print(f"mcp-heal-proxy: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        sys.exit(130)
