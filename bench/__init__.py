"""Benchmark harness: the same MCP workload direct, through nginx, and through mcp-heal-proxy.

Run ``python -m bench`` (see docs/benchmarks.md).
"""
