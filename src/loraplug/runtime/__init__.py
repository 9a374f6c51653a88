"""Running adapters: bypass hooks and exact, reversible merges."""
