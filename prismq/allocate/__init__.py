"""Allocation: per decision unit one format, minimum predicted delta-loss within a byte budget (knapsack.py), the
frontier over a sweep of budgets with its knee and plot (pareto.py), and the problem built from cost rows
(budget.py)."""
