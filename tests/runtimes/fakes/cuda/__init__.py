"""Fake cuda-python (tests only): see bindings/runtime.py."""
