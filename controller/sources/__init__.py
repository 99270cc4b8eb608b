"""Config sources: where resources come from (files, the Kubernetes API)."""
