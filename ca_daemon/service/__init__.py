"""The long-running service: passes, leader election, the data-dir lock, metrics, wiring."""
