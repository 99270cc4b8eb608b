"""Node and workload identities: certificates from the controller, kept in memory."""
