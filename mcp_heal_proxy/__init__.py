"""mcp-heal-proxy: keeps MCP Streamable HTTP sessions alive when the upstream forgets them."""

__version__ = "0.1.0"
