"""Contract suites: the behaviour every backend keeps, as pytest tests yours can run."""
