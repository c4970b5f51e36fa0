"""The machine a study runs on: GPUs (NVML), CPU topology, RAM, and the model's sizes from
its config.json; a space's `hardware:` block can describe another machine."""
