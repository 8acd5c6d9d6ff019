"""One module per ``crossformer`` subcommand: ``add_arguments(parser)`` and ``run(args)``."""
