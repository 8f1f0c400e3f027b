"""Training of both stages (CPU or CUDA; one process or many through torchrun)."""
