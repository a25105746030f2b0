"""The admin console: partners, limits, budgets, spend, partitions; pause, drain and resume."""
