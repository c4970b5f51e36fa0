"""Will a configuration fit before it is launched: sglang-kt's per-GPU memory accounting
and CPU layout as a model, its verdict with the binding constraint and a fix, and the
per-run gate that fills `auto` values and learns from what launched servers logged."""
