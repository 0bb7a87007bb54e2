"""auth_svc: accounts, sessions, API keys and tiers; Envoy's first ext_authz filter."""
