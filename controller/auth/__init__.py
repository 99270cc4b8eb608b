"""How nodes prove who they are to the controller (besides the local store's tokens)."""
