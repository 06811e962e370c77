"""A PyTorch re-implementation of the official model, for tests/test_reference.py."""
