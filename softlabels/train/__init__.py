"""Stage two: batches and streams of stored targets, losses, the trainer, resume, ranks."""
