"""Data layer: readers for the benchmark formats, shards, the text tokenizer, Shapes."""
