"""How many cards a model needs, and which layers each card holds.

`sizes` reads and prints byte sizes, `model_shape` turns a config.json (Hugging Face or
ours) into the canonical widths, dense or sliced, `memory` prices each part of a stage in
bytes, and `planner` cuts the layers into contiguous stages.
"""
