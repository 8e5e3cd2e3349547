"""A training run: the recipe, optimizer and schedule, the session it holds, the loop and its
steps, saved state and resume, the run folder, and the study of strategies. Imports ``models``,
``report`` and below."""
