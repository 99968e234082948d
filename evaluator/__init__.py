"""The evaluator: scores every task attempt with a verdict, a reward and structured feedback."""
