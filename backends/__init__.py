"""Model backends the gateway routes to; `reference` is our own OpenAI-compatible one."""
