"""File layouts of models: readers and writers that know where tensors, configs and tokenizers
live on disk, and nothing of device policy, quantization or LoRA.

    checkpoint   chatforge checkpoint directories (config.json + model.safetensors + tokenizer)
    safetensors  safetensors / pytorch_model.bin files read a tensor, or a slab of rows, at a time
    adapter      LoRA adapter directories (adapter_config.json + adapter_model.safetensors)
    hf/          Hugging Face directories (read, export), their family tables and the Hub cache
    gguf         GGUF files (llama.cpp, Ollama, LM Studio): config, tokenizer, tensors or 4-bit blocks
    ollama       Ollama's model store: ollama:NAME[:TAG] -> the GGUF blob its manifest names

Below chatforge.loader and chatforge.export (which decide dtype, device and quantization and call
these), above the model, the tokenizer and utils; it imports neither chatforge.quantize nor
chatforge.lora.
"""
