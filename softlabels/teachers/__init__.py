"""MODEL specs: the teacher models (torchvision, timm, Hugging Face, gpt, checkpoints) with their
own preprocessing, and the ensemble that runs them."""
