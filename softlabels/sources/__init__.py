"""DATA specs: the data a teacher reads (arrays, torchvision datasets, image folders, Hugging Face
datasets, tar shards, token sequences, raw text)."""
