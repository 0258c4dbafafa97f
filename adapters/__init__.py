"""Integrations with agent frameworks."""
