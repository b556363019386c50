"""Measurements on a model: activation ranges now; Fisher, cost and KL as they are built."""
