"""configs/reward package."""
