"""The training run: setup and loop, checkpoints, the workdir lock, metrics, previews, the run's exports and its Hub
folder, multi-host setup, populations of runs, and the whole-config check each command makes before any work."""
