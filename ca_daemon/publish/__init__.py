"""Publishers: each reconciles the desired trust world into one place. They never decide."""
