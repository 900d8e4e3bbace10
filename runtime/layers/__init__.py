"""One module per node kind, each owning its forward and its backward."""
