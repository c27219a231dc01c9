"""The training engine: its typed configuration, the driver, one epoch's loop, the checkpoint, the loggers'
interface, speed options."""
