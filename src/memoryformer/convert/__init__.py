"""Turn other models into MemoryFormers: least-squares table fits from a dense model (docs/convert.md)."""
