"""The decode worker: a Ray actor running continuous batching over received KV."""
