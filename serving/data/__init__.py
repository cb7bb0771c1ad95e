"""Data files shipped with the package (the tiny model's tokenizer corpus); a package so setuptools installs it."""
