"""Self-hosted Llama 2 chat serving engine."""
