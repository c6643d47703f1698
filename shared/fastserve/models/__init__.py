"""What a model folder is, shared by every service: where a reference points (`refs`), its kind and task
(`kinds`), how it loads (`loading`, with `quantized` for torchao folders and `pruned` for head-pruned
ones), its tokenizer (`tokenizers`), pooling (`pooling`), and the encoder backends (`encoders`).

A folder one service writes (optimization's pruned or quantized model, training's checkpoint) is read by
another (inference, a later optimization or training job); keeping that knowledge here, and not in any
service, is what lets them share folders without importing each other; so nothing under `fastserve.models`
imports a service. This package imports nothing itself: `refs` stays free of torch.
"""
