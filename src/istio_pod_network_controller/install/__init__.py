"""Install-time pieces: the pod rewrite of `inject` and the webhook, the webhook server, the RBAC rules."""
