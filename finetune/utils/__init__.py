"""The lowest layer: atomic file writes, the runtime (device, precision, threads, processes) and
stop signals. Imports nothing of finetune but ``errors``."""
