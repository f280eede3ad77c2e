"""Placeholder: filled by the export / runtime / benchmark issues."""
