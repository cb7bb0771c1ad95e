import os
import tempfile

# Nothing a test starts may write to the home folder: the embedded model's cache and Ray's auth token.
os.environ.setdefault("MOSAIC_CACHE_DIR", tempfile.mkdtemp(prefix="mosaic-test-cache-"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

pytest_plugins = [
    "tests.fixtures.checkpoints",
    "tests.fixtures.gateway",
    "tests.fixtures.stack",
    "tests.fixtures.redis_server",
]
