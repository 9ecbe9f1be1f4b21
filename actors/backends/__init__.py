"""Generator backends: vLLM (``vllm_backend``) and plain HF transformers (``hf_backend``)."""

BACKENDS = ("vllm", "hf")  # generator.backend's choices (actors.generator.make_backend)
