"""The mesh certificate authority and SPIFFE helpers shared with the agent."""
