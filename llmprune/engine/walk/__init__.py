"""The one layer walker: decoder layers visited in order, from memory or streamed from disk.

`layer_store` runs one layer at a time on calibration hidden states;
`streaming` reads (and writes) a safetensors model a layer at a time, so that
pruning, layer importance, evaluation and the doctor's forward test work on
models larger than the device. Depends on `io` and `core` only.
"""
