"""Before the first launch: `kttune doctor` (interpreters, flags, GPUs, CPU, model, storage),
the server's and bench client's accepted flags, and `kttune plan` (one configuration's
memory breakdown, nothing launched)."""
