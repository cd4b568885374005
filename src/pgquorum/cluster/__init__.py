"""The cluster model (nodes, groups, states) and the router's view of it."""
