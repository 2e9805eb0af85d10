"""Music -> EnCodec codes -> token streams, and back.

io.py      read any audio file soundfile can (wav/flac/ogg/mp3...) as mono float32 at one rate; write wav/flac
codec.py   EnCodec through transformers: load, encode long files in silence-aware chunks, decode
codes.py   the .npz code file (codes int16 n_codebooks x frames + metadata), validated on load
score.py   per-chunk features and a priority score for every file -> one Parquet table
pretokenize.py  a folder of code files -> llm.c shards with the audio tokenizer (`lmkit pretokenize`), with each
                file's place in the token stream in meta.json
sampler.py      training windows centred on scored chunks drawn ∝ priority (data.sampling = "priority")
rollout.py      `lmkit audio rollout`: prompts from an audio file (or training codes), continuation / in-fill
                "tape" with a T5 trained on codes, decoded to wav

The token layouts (codebook0 / flatten / delay) live in toolkit/tokenizers/audio.py.
"""

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au")
DEFAULT_CODEC = "facebook/encodec_24khz"
DEFAULT_BANDWIDTH = 6.0  # kbps: 8 codebooks of 1024 at 75 Hz for the 24 kHz model
