"""The CUDA kernels: thread-block TIR, its schedules and tuning, the driverless build, fatbin checks."""
