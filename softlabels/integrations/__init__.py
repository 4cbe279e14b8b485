"""Stage two inside other training loops. Each integration imports its framework lazily; the
core never imports an integration."""
