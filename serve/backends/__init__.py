"""The models serving runs, behind the calls protocol.py types: on token ids, in ONNX Runtime or PyTorch.

    python -m lite_sft.serve.runtime exports/demo --prompt-ids 1,2,3      # which provider, and a greedy step

factory.py turns a folder into a backend (load_backend); ort.py is the ONNX decoder with its KV pool,
pytorch.py a Hugging Face causal LM, seq2seq.py an encoder-decoder, encoder.py a classifier; devices.py and
folder.py are what they share (the device and onnxruntime sessions; the tokenizer, context and stop ids a
model folder holds). Nothing here knows the engine or HTTP: those sit above and see only protocol.py's calls.
"""
