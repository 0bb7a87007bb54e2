"""ratelimit_svc: per-key request windows, Envoy's second ext_authz filter."""
