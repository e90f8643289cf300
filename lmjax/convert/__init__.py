"""The conversion floor: checkpoints of other frameworks to and from lmjax params (`hf`: Hugging
Face safetensors, one name-and-transform table).

May import: lmjax.model (the parameter table), lmjax.parallel (gathers of params sharded over
several processes) and the top-level modules. Re-exports nothing.
"""
