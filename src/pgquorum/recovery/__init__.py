"""Online recovery of a FAILED node: rebuilding it from a consistent snapshot of a healthy one."""
