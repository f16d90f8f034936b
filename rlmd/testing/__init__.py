"""Real loopback servers with scripted answers, for tests and benchmarks."""
