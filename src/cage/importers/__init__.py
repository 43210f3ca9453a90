"""Transcript and log importers: each turns a source into ledger events."""
