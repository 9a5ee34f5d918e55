"""Pipeline stages in separate processes (one per stage, launched by torchrun), talking
through torch.distributed point-to-point sends: gloo on CPUs, NCCL on GPUs.

Rank 0 holds the first stage, the engine and the HTTP front (`front.py`); every other rank
runs `stage_worker.serve_stage`: receive a message from the rank before, run its layers
with its own KV cache, send on; the last rank sends the logits back to rank 0.
`messages.py` says what travels, `process_group.py` how the processes find each other.
"""
