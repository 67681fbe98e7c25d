"""The speculative decoding runtime."""
