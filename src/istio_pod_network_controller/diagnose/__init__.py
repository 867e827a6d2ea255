"""Diagnosis from a workstation or a node: `status` explains one pod; `rules verify --pod` reads its spec."""
