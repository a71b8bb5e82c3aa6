"""The fronts: how clients reach the session engine (HTTP: aiohttp and the proxy's own server; stdio)."""
