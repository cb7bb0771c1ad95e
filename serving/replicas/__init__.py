"""The Ray Serve replicas (LLM, embeddings) and what they take from the cluster. No HTTP here: errors go
back to the ingress as values (serving.engine.errors.ErrorResult), which maps them to statuses."""
