"""What is read back for people: status, verify, RBAC output, the schema, the forecast."""
