"""What a person sees: console tables and progress, metrics, pictures and the experiment
trackers. Imports ``data`` and below."""
