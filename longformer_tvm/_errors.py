"""The errors a call raises when no compiled kernel can serve it."""


class KernelNotAvailableError(RuntimeError):
    """No compiled kernel fits this device, dtype and installation."""


class KernelIntegrityError(RuntimeError):
    """A library file does not match the sha256 its manifest records, or does not load."""
