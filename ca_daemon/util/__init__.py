"""Ground floor: files, rate limits, the Kubernetes client, logs, durations."""
