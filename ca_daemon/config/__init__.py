"""Configuration: the settings model, its rules, and loading it from YAML and the environment."""
