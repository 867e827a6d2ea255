"""Everything that touches a network namespace: pinning, entering, running the rule tools, reading state."""
