"""Command-line interface (`diffutron-engine`): one module per subcommand. Nothing imports this package."""
