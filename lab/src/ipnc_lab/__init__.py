"""The project's test lab: the Kubernetes API emulator, the node simulator and the demo.

Never shipped in the product's wheel or image; the product never imports it (tests/test_layers.py).
"""
