"""CuTe DSL kernels (nvidia-cutlass-dsl) for Hopper (sm_90a) and their compile cache. Nothing here is imported by `import grouped`; backend adapters import it lazily."""
