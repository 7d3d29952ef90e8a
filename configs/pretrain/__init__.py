"""configs/pretrain package."""
