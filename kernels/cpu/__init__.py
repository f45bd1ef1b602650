"""The CPU backend: C kernels (csrc/, built and loaded by native.py), the packed-weight bf16
projections (linear.py), the ops behind KernelOps (ops.py) and every decoder layer in one C call
(layer_loop.py). Each op is tested against its twin in kernels.reference."""
