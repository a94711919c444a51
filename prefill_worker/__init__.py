"""The prefill worker: a Ray actor that computes prompts' KV and streams it to decode."""
