"""The asyncio router: client sessions, node connections, lead-first replication, admin console."""
