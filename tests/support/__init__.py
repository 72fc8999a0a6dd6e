"""Helpers shared by the tests: service lookup (services), Kafka (kafka), PostgreSQL (postgres)."""

import warnings

# kafka-python 3.0 loads its protocol schemas with a deprecated importlib.resources API, once per
# message type, on import and later on first use; pytest_configure in tests/conftest.py covers the
# warnings raised while tests run, this one those raised while conftest imports kafka.
warnings.filterwarnings(
    "ignore", message=r"(read_text|open_text) is deprecated", category=DeprecationWarning
)
