"""The reference OpenAI-compatible backend: deterministic text, cheap per request."""
