"""lm-evaluation-harness over our runtime: a scoring model (scorer.py), the batched maths of
scoring and greedy generation (scoring.py, generation.py), the registered lm-eval model class
(lm.py), and task loading whose failures read as one line (tasks.py)."""
