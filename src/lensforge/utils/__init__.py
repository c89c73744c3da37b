"""Helpers shared by several stages (atomic files, hashing)."""
