"""Allow ``python -m mcp_heal_proxy``."""

from mcp_heal_proxy.cli import main

if __name__ == "__main__":
    main()
