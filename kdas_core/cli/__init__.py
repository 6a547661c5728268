"""Shared pieces of every command line: exit codes, error types, argument types and the training runner."""
