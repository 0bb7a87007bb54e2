"""ledger_svc: prepaid credit as a double-entry journal, Envoy's paying-ability check, usage."""
