"""Test support: real servers, real processes, bounded waits."""
