"""The CPU kernels: targets (ISA levels), the tiled TIR, its schedules and tuning, the build."""
