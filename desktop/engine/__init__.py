"""The fleet engine: Qt-free and asyncio-based; `client` is the desktop side of one agent connection."""
