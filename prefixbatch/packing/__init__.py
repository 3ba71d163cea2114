"""Packing: fitting tree segments and decode tokens into per-step token budgets. Never imports torch."""
