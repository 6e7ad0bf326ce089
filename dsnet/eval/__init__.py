"""Evaluation: metrics over subnets and the gate, routing statistics, result tables and
plots, Pareto fronts."""
