"""@triton.jit kernels and their host launchers, one module per op family.

Imported lazily by the ops (never at ``import fastverify``)."""
