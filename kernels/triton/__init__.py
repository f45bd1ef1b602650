"""The Triton backend: one module per kernel, each with a torch twin in kernels.reference.

Sibling imports are relative so tests can load a private interpreter-mode copy of the whole
package (tests/kernels/conftest.py). Importing this package imports no Triton.
"""
