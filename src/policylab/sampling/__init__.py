"""Prompt samplers, group filters, curricula and prompt transforms."""
