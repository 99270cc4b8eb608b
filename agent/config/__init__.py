"""Receiving configuration from the controller."""
