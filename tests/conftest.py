pytest_plugins = [
    "tests.fixtures.checkpoints",
]
