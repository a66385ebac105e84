"""Math core: pure torch (no Lightning). The formulas of docs/math.md composed from small pieces."""
