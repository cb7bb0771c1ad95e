"""MLflow AI Gateway provider plugin `mosaic`: routes gateway endpoints to the self-hosted serving tier.

Registered under the entry point group `mlflow.gateway.providers`; the class lives in
`mlflow_mosaic_provider.provider`, imported by MLflow only when it loads its provider registry.
"""
