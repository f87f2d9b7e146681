"""Pure PyTorch / numpy: no prefect, no ray in this package."""
