"""The HTTP client to upstream MCP servers (aiohttp's, or the lean httptools pool)."""
