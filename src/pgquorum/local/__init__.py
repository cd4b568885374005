"""Local clusters: finding PostgreSQL binaries, creating and running servers, `pgquorum up`."""
