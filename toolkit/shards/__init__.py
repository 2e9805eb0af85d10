"""Token shards: the format on disk (format.py), making them from text, conversations, llama2.c files
(pretokenize.py) and audio codes (audio.py), reading them as batches (sampler.py, span_corruption.py),
and the whole chain a recipe needs (prepare.py)."""
