"""Tools on a finished transfer set: verify, evaluate, report, export and import."""
