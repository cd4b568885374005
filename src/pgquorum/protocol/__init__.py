"""Sans-IO PostgreSQL protocol 3.0 codec: bytes in, messages out; no sockets, no asyncio."""
