"""Code generation: Triton kernels and the generated program that calls them."""
