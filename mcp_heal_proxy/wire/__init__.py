"""Pure formats: JSON-RPC, SSE, headers, content codings (no I/O)."""
