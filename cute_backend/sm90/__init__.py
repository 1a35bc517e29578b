"""Our sm_90a (Hopper) grouped GEMM kernels: host modules here, device code in *_kernel.py."""
