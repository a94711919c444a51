"""The generated Python modules of the protocol buffers in proto/ (`make proto` rebuilds them)."""
