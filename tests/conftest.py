pytest_plugins = [
    "tests.fixtures.checkpoints",
    "tests.fixtures.gateway",
    "tests.fixtures.stack",
]
