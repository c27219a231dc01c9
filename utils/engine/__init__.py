"""The training engine: the driver, one epoch's loop, the checkpoint, torchrun, speed options."""
