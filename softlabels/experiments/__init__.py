"""The paper's experiments: the pipeline runner, its recipes and their plots. They use the
library like any user would; nothing in the library imports them."""
