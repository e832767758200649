"""One module per ``bigain`` subcommand (see :mod:`bigain.cli`)."""
