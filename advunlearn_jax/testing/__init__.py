"""What tests and benchmarks share, and the product never imports: tiny random models and the PyTorch
transcription of the reference (an oracle for the tests, the baseline of the benchmarks; it needs torch)."""
