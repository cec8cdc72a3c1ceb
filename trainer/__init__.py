"""The TRM ranker, its baselines, and the continuous trainer on point-in-time Feast features."""
