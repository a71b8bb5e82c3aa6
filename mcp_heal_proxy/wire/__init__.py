"""Pure formats: JSON-RPC, SSE, headers, content codings (no I/O); ``responses``: JSON-RPC errors as
aiohttp response objects."""
