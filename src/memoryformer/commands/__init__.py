"""One module per `memoryformer` verb: each defines `add_arguments(parser)` and `run(args)`."""
