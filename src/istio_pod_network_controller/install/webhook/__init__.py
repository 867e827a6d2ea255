"""Optional mutating admission webhook: the same pod rewrite as `inject`, applied as pods are created.

Registered after Istio's injector with reinvocationPolicy IfNeeded, so it sees the pod once istio-init is in.
"""
