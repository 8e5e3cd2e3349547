"""Images in, tensors out: dataset layouts and their splits, decoding, preprocessing presets,
loaders, the preflight, and the datasets that ship or download. Imports ``utils`` and ``config``."""
