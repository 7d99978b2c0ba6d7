"""The shipped configurations (TOML), installed as package data: `--config NAME` finds them."""
