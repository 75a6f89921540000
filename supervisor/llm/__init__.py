"""Guarded LLM calls: providers, the degradation ladder, budgets, rate limits, cache."""
